"""FActScore of generated bios as the LMLM paper scores it, lookup quality beside it, and the same scored by an
LLM judge when an OpenAI-compatible endpoint is configured.

The paper's protocol: every lookup call is removed from a generation before its facts are extracted and judged,
so only the text a reader sees is scored, by the same judge for every model. Atomic facts of that visible text
are found by matching each sentence against the corpus's own sentence templates (every fact sentence of the
synthetic corpus comes from one), so a fact is a (relation, value) claim about the bio's subject, whatever value
the model made up. A fact is supported when the ground truth gives the subject that value for that relation.

The calls themselves are scored apart (:func:`lookup_checks`): whether a call's key fetched a true fact about
the subject (lookup precision), and whether the model then wrote the fetched value (copied correctly). A call
that fetched the right value followed by a wrong mention is a right lookup and an unsupported fact.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

from lookup import UNKNOWN, normalize_key
from models.generate import GenerationResult, generate_batched, without_calls
from schemas.configs import EndpointConfig
from schemas.errors import UserInputError
from schemas.markup import DB_ENTITY, mention_span, parse_lenient, strip
from tasks.ground_truth import GroundTruth

logger = logging.getLogger(f"lmlm.{__name__}")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ----------------------------------------------------------------------------- atomic facts


@dataclass(frozen=True)
class AtomicFact:
    """A (relation, value) claim the visible text of a bio makes about its subject."""

    relation: str
    value: str
    supported: bool


@dataclass(frozen=True)
class LookupCheck:
    """One lookup call a model wrote in a bio, checked against the ground truth and the text after it."""

    entity: str
    relation: str
    value: str  # what the database returned (``unknown`` on a miss)
    true_fact: bool  # the key named the subject and fetched the subject's true value for the relation
    copied: bool  # the visible text right after the call states the fetched value


_NAME = r"(?:[A-Z][\w'’.&-]*(?: [A-Z][\w'’.&-]*){0,4}|[Ss]he|[Hh]e|[Hh]er|[Hh]is|[Hh]im|[Ii]ts?|[Tt]he \w+(?: \w+)?)"


@lru_cache(maxsize=1)
def _sentence_patterns() -> tuple[tuple[re.Pattern, tuple[str, ...], int], ...]:
    """(regex, relations in slot order, literal length) for every person fact template of the corpus."""
    from tasks.synthetic_documents import INTRO_TEMPLATES, TEMPLATES, _parse_template

    out = []
    for table in (INTRO_TEMPLATES["person"], TEMPLATES["person"]):
        for templates in table.values():
            for template in templates:
                parts, relations, literal = ["^"], [], 0
                for text, slot in _parse_template(template):
                    parts.append(re.escape(text))
                    literal += len(text)
                    if slot is None:
                        break
                    if slot in ("N", "S", "s", "P", "p", "O"):
                        parts.append(_NAME)
                    elif slot == "is":
                        parts.append("(?:is|was)")
                    elif slot.startswith("a:") or slot == "kind":
                        parts.append(r"(?:an?|\w+)")
                    else:
                        parts.append(f"(?P<r{len(relations)}>.+?)")
                        relations.append(slot)
                parts.append("$")
                if relations:
                    out.append((re.compile("".join(parts)), tuple(relations), literal))
    # most slots first, then the most literal text: "born on {Birth Date} in {Birth City}" beats "born on {Birth Date}"
    out.sort(key=lambda p: (-len(p[1]), -p[2]))
    return tuple(out)


def sentence_facts(sentence: str) -> list[tuple[str, str]]:
    """(relation, value) pairs a sentence states, by the first (most specific) corpus template it matches."""
    sentence = sentence.strip()
    for regex, relations, _ in _sentence_patterns():
        m = regex.match(sentence)
        if m:
            return [(rel, m[f"r{i}"].strip()) for i, rel in enumerate(relations)]
    return []


def same_value(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and normalize_key(a) == normalize_key(b)


def extract_facts(subject: str, prompt: str, result: GenerationResult, gt: GroundTruth) -> list[AtomicFact]:
    """The distinct atomic facts the visible text of a generated bio of ``subject`` states (every lookup call
    removed first, as the paper's scorer does), each checked against the ground truth. The prompt's unfinished
    sentence ("X is") is read with the continuation, so "X is" + " an American chemist." states the occupation."""
    facts: dict[tuple[str, str], AtomicFact] = {}
    tail = prompt[prompt.rfind(". ") + 2:] if ". " in prompt else prompt  # the prompt's unfinished sentence
    for sentence in _SENTENCE_END.split(tail + without_calls(result.text)):
        for relation, value in sentence_facts(sentence):
            if value == UNKNOWN:  # the mention after a missed lookup states nothing
                continue
            key = (normalize_key(relation), normalize_key(value))
            if key not in facts:
                facts[key] = AtomicFact(relation, value, same_value(gt.value(subject, relation), value))
    return list(facts.values())


def lookup_checks(subject: str, result: GenerationResult, gt: GroundTruth) -> list[LookupCheck]:
    """Every complete lookup call in a bio (``result.text`` with its markup), checked: did its key fetch a true
    fact about ``subject``, and does the visible text right after it state the fetched value."""
    text = result.text
    if DB_ENTITY in strip(text):  # a call the token limit cut off fetched nothing
        text = text[:text.rindex(DB_ENTITY)]
    ann, _ = parse_lenient(text)
    checks = []
    for pc in ann.calls:
        call = pc.call
        hit = call.value != UNKNOWN
        true_fact = hit and gt.resolve(call.entity) == subject and same_value(gt.value(subject, call.relation), call.value)
        copied = hit and mention_span(ann.text, pc.offset, call.value) is not None
        checks.append(LookupCheck(call.entity, call.relation, call.value, true_fact, copied))
    return checks


def _length_penalty(n_facts: int, gamma: float) -> float:
    """The paper's penalty for short answers: exp(1 - gamma / n) below gamma facts."""
    return math.exp(1 - gamma / n_facts) if n_facts < gamma else 1.0


def factscore(per_response: Sequence[Sequence[AtomicFact | bool]], gamma: float = 10.0) -> dict:
    """FActScore over responses (each a list of facts or of supported flags).

    ``factscore``: mean precision over all responses, a response that states no fact scoring 0 (no credit for
    saying nothing); ``factscore_responded``: the mean over the responses that state any fact (the paper's
    convention, where the rest abstain); ``factscore_length_penalty``: each response's precision times
    exp(1 - gamma/n) for n < gamma facts (the paper's gamma is 10), over all responses, no facts scoring 0."""
    flags = [[f if isinstance(f, bool) else f.supported for f in facts] for facts in per_response]
    precision = [sum(f) / len(f) if f else 0.0 for f in flags]
    penalised = [p * _length_penalty(len(f), gamma) if f else 0.0 for p, f in zip(precision, flags)]
    responded = [p for p, f in zip(precision, flags) if f]
    n = len(flags)
    return {
        "responses": n,
        "responded": len(responded),  # responses with at least one fact (the rest abstain)
        "responded_share": len(responded) / n if n else 0.0,
        "factscore": sum(precision) / n if n else 0.0,
        "factscore_responded": sum(responded) / len(responded) if responded else 0.0,
        "factscore_length_penalty": sum(penalised) / n if n else 0.0,
        "gamma": gamma,
        "facts_per_response": sum(map(len, flags)) / n if n else 0.0,
        "supported_per_response": sum(map(sum, flags)) / n if n else 0.0,
    }


def lookup_quality(per_response: Sequence[Sequence[LookupCheck]]) -> dict:
    """Lookup precision (calls whose key fetched a true fact about the subject, over all calls written) and
    copied correctly (calls whose fetched value the visible text then states, over the calls that fetched one);
    None where there is no call to judge."""
    calls = [c for checks in per_response for c in checks]
    hits = [c for c in calls if c.value != UNKNOWN]
    n = len(per_response)
    return {
        "lookups_per_response": len(calls) / n if n else 0.0,
        "lookup_precision": sum(c.true_fact for c in calls) / len(calls) if calls else None,
        "lookup_copied": sum(c.copied for c in hits) / len(hits) if hits else None,
        "true_lookups_not_stated": sum(c.true_fact and not c.copied for c in calls),
    }


def bio_report(model, tokenizer, people: list[str], lookup, gt: GroundTruth, *, prompt: str, max_new_tokens: int,
               gamma: float, batch_size: int, document_start: bool = False) -> tuple[dict, list[dict]]:
    """FActScore of open-ended bios (visible text only) and the quality of their lookups; returns the figures
    and one record per bio (prompt, text with and without calls, facts, lookups)."""
    prompts = [prompt.format(entity=p) for p in people]
    results = generate_batched(model, tokenizer, prompts, lookup, max_new_tokens, batch_size, document_start)
    per, checks, records = [], [], []
    for person, p, r in zip(people, prompts, results):
        facts, calls = extract_facts(person, p, r, gt), lookup_checks(person, r, gt)
        per.append(facts)
        checks.append(calls)
        records.append({"entity": person, "prompt": p, "text": r.text, "text_without_calls": r.text_without_calls,
                        "facts": [asdict(f) for f in facts], "lookups": [asdict(c) for c in calls]})
    return {**factscore(per, gamma), **lookup_quality(checks)}, records


# ----------------------------------------------------------------------------- LLM judge


JUDGE_SYSTEM = (
    "You verify short biographies against a knowledge source. Break the biography into atomic facts "
    "(one claim each) and mark each one supported only if the knowledge source states it. Answer with JSON: "
    '{"facts": [{"fact": "<one claim>", "supported": true|false}]}'
)


def judge_prompt(subject: str, facts: dict[str, str], text: str) -> str:
    known = "\n".join(f"- {subject} / {r}: {v}" for r, v in sorted(facts.items()))
    return f"Knowledge source about {subject}:\n{known}\n\nBiography of {subject}:\n{text.strip()}"


def parse_judgement(content: str) -> list[bool]:
    """The supported flags of a judge's answer (JSON, possibly inside a code fence); [] when none."""
    match = re.search(r"\{.*\}", content or "", re.DOTALL)
    if not match:
        return []
    try:
        data = json.loads(match[0])
    except json.JSONDecodeError:
        return []
    items = data.get("facts") if isinstance(data, dict) else None
    return [bool(f.get("supported")) for f in items or [] if isinstance(f, dict)]


def judge_report(records: list[dict], gt: GroundTruth, endpoint: EndpointConfig, gamma: float) -> dict:
    """FActScore with an LLM judge over bio records (from :func:`bio_report`)."""
    import openai

    from tasks.endpoint import api_key

    client = openai.OpenAI(base_url=endpoint.base_url, api_key=api_key(endpoint), timeout=endpoint.timeout_s,
                           max_retries=endpoint.max_attempts - 1)
    per, failed = [], 0
    for rec in records:
        kwargs = {}
        if endpoint.structured_output != "inline":
            kwargs["response_format"] = {"type": "json_object"}
        try:
            answer = client.chat.completions.create(
                model=endpoint.model, temperature=endpoint.temperature, max_tokens=endpoint.max_tokens,
                messages=[{"role": "system", "content": JUDGE_SYSTEM},
                          {"role": "user", "content": judge_prompt(rec["entity"], gt.facts[rec["entity"]],
                                                                   rec["prompt"].split(". ")[-1] + rec["text_without_calls"])}],
                **kwargs)
        except openai.APIConnectionError as exc:
            raise UserInputError(f"judge endpoint {endpoint.base_url}: cannot connect ({exc}); start it or fix "
                                 "evaluation.judge.base_url") from None
        except openai.AuthenticationError:
            raise UserInputError(f"judge endpoint {endpoint.base_url}: the key in ${endpoint.api_key_env} was "
                                 "rejected; export a valid key") from None
        except openai.APIStatusError as exc:
            failed += 1
            logger.warning("judge: %s answered %s for %s", endpoint.base_url, exc.status_code, rec["entity"])
            continue
        flags = parse_judgement(answer.choices[0].message.content)
        per.append(flags)
    report = factscore(per, gamma)
    report.update(judge=endpoint.model, failed=failed)
    return report
