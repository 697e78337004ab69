"""FActScore of generated bios: atomic facts found in the generated text and judged against the ground
truth, and the same scored by an LLM judge when an OpenAI-compatible endpoint is configured.

Atomic facts of a generated bio are found by matching each generated sentence against the corpus's
own sentence templates (every fact sentence of the synthetic corpus comes from one), so a fact is a
(relation, value) claim about the bio's subject, whatever value the model made up; for an LMLM, each
lookup call it wrote is a fact too (entity, relation and the value the database returned). A fact is
supported when the ground truth gives the subject that value for that relation.
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
from models.generate import GenerationResult, generate_batched
from schemas.configs import EndpointConfig
from schemas.errors import UserInputError
from schemas.markup import DB_ENTITY, SPECIAL_TOKENS, parse_lenient, strip
from tasks.ground_truth import GroundTruth

logger = logging.getLogger(f"lmlm.{__name__}")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_STRAY = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))


# ----------------------------------------------------------------------------- atomic facts


@dataclass(frozen=True)
class AtomicFact:
    relation: str
    value: str
    supported: bool
    source: str  # "text" (a sentence stating it) or "lookup" (a call the model wrote)
    entity: str | None = None  # for lookups: the entity the call named


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
    """The distinct atomic facts a generated bio of ``subject`` states, each checked against the ground
    truth: its calls (entity, relation, value looked up; misses state nothing) and its sentences."""
    facts: dict[tuple[str, str], AtomicFact] = {}
    text = result.text
    if DB_ENTITY in strip(text):  # a call the token limit cut off states nothing
        text = text[:text.rindex(DB_ENTITY)]
    ann, _ = parse_lenient(text)
    for pc in ann.calls:
        call = pc.call
        if call.value == UNKNOWN:
            continue
        about = gt.resolve(call.entity)
        ok = about == subject and same_value(gt.value(subject, call.relation), call.value)
        key = (normalize_key(call.relation), normalize_key(call.value))
        facts.setdefault(key, AtomicFact(call.relation, call.value, ok, "lookup", call.entity))
    body = _STRAY.sub("", ann.text)
    tail = prompt[prompt.rfind(". ") + 2:] if ". " in prompt else prompt  # the prompt's unfinished sentence
    for sentence in _SENTENCE_END.split(tail + body):
        for relation, value in sentence_facts(sentence):
            if value == UNKNOWN:  # the mention after a missed lookup states nothing
                continue
            key = (normalize_key(relation), normalize_key(value))
            if key not in facts:
                facts[key] = AtomicFact(relation, value, same_value(gt.value(subject, relation), value), "text")
    return list(facts.values())


def factscore(per_response: Sequence[Sequence[AtomicFact | bool]], gamma: float = 10.0) -> dict:
    """FActScore over responses (each a list of facts or of supported flags): mean precision over the
    responses that state any fact, and the same with the length penalty x exp(1 - gamma/n) for n < gamma."""
    flags = [[f if isinstance(f, bool) else f.supported for f in facts] for facts in per_response]
    scored = [f for f in flags if f]
    precision = [sum(f) / len(f) for f in scored]
    penalised = [p * (math.exp(1 - gamma / len(f)) if len(f) < gamma else 1.0) for p, f in zip(precision, scored)]
    n = len(flags)
    return {
        "responses": n,
        "responded": len(scored),  # responses with at least one fact (the rest abstain)
        "factscore": sum(precision) / len(precision) if precision else 0.0,
        "factscore_length_penalty": sum(penalised) / len(penalised) if penalised else 0.0,
        "facts_per_response": sum(map(len, flags)) / n if n else 0.0,
        "supported_per_response": sum(map(sum, flags)) / n if n else 0.0,
    }


def bio_report(model, tokenizer, people: list[str], lookup, gt: GroundTruth, *, prompt: str, max_new_tokens: int,
               gamma: float, batch_size: int, document_start: bool = False) -> tuple[dict, list[dict]]:
    """FActScore of open-ended bios; returns the figures and one record per bio (prompt, text, facts)."""
    prompts = [prompt.format(entity=p) for p in people]
    results = generate_batched(model, tokenizer, prompts, lookup, max_new_tokens, batch_size, document_start)
    per, records = [], []
    for person, p, r in zip(people, prompts, results):
        facts = extract_facts(person, p, r, gt)
        per.append(facts)
        records.append({"entity": person, "prompt": p, "text": r.text, "text_without_calls": r.text_without_calls,
                        "facts": [asdict(f) for f in facts]})
    report = factscore(per, gamma)
    report["lookup_facts_per_response"] = sum(f.source == "lookup" for fs in per for f in fs) / max(len(per), 1)
    return report, records


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
