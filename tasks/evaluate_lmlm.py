"""Evaluating an LMLM against its standard baseline: normalized perplexity (oracle and own lookups),
FActScore-style factual precision of bios, T-REx/LAMA-style cloze probes, fact editing and unlearning
through the warehouse, and FActScore with an LLM judge.

Plain functions over a model, its tokenizer, a lookup index and the synthetic ground truth
(``tasks/synthetic``: kb, people, aliases); the flow in ``flows/lmlm.py`` decides where they run.

Atomic facts of a generated bio are found by matching each generated sentence against the corpus's
own sentence templates (every fact sentence of the synthetic corpus comes from one), so a fact is a
(relation, value) claim about the bio's subject, whatever value the model made up; for an LMLM, each
lookup call it wrote is a fact too (entity, relation and the value the database returned). A fact is
supported when the ground truth gives the subject that value for that relation.
"""

from __future__ import annotations

import logging
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from pydantic import BaseModel

from lookup import UNKNOWN, LookupDatabase, name_words, normalize_key, open_index, open_lookup
from models.embed import embed
from models.generate import GenerationResult, generate
from models.lmlm import Perplexity, normalized_perplexity
from schemas.configs import EndpointConfig
from schemas.errors import UserInputError
from schemas.markup import DB_ENTITY, SPECIAL_TOKENS, Annotated, LookupCall, PlacedCall, parse, parse_lenient, render, strip

logger = logging.getLogger(f"lmlm.{__name__}")  # flows/ attach the lmlm logger to Prefect's run log

# Cloze prompts in the corpus's own phrasing ("{S} was born on {Birth Date}."), the value cut off.
CLOZE_TEMPLATES: dict[str, str] = {
    "Birth Date": "{N} was born on",
    "Birth City": "{N} was born in",
    "Occupation": "{N} worked as",
    "Alma Mater": "{N} studied at",
    "Major": "{N} majored in",
    "Graduation Year": "{N} graduated in",
    "Employer": "{N} worked for",
    "Employer City": "{N} worked in",
    "Spouse": "{N} married",
    "Honor": "{N} received the",
    "Child": "{N} had a child,",
    "Death Date": "{N} died on",
}
EXACT_MATCH_WORDS = 5  # cloze exact match: the gold value starts within the first 5 generated words
_ARTICLES = ("a ", "an ", "the ")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_STRAY = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))


# ----------------------------------------------------------------------------- ground truth


@dataclass
class GroundTruth:
    """The synthetic world's facts: value per (entity, relation), people, and the short names text uses."""

    facts: dict[str, dict[str, str]]  # entity -> relation -> value
    entity_type: dict[str, str]
    people: list[tuple[str, str]]  # (entity, biography doc_id), in ground-truth order
    aliases: dict[str, str]  # normalised alias -> entity
    _by_key: dict[str, str] = field(default_factory=dict, repr=False)  # normalised name -> entity

    def __post_init__(self) -> None:
        self._by_key = {normalize_key(e): e for e in self.facts}

    def resolve(self, name: str) -> str | None:
        """The ground-truth entity a name (full name or alias) refers to, if any."""
        key = normalize_key(name)
        return self._by_key.get(key) or self.aliases.get(key)

    def value(self, entity: str, relation: str) -> str | None:
        rels = self.facts.get(entity, {})
        want = normalize_key(relation)
        return next((v for r, v in rels.items() if normalize_key(r) == want), None)


def load_ground_truth(folder: str) -> GroundTruth:
    """The ground truth ``tasks.synthetic.generate_corpus`` wrote (kb, people, aliases parquet files)."""
    import pyarrow.parquet as pq

    paths = {name: os.path.join(folder, f"{name}.parquet") for name in ("kb", "people", "aliases")}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise UserInputError(f"ground truth {folder}: no {', '.join(os.path.basename(p) for p in missing)}; point "
                             "evaluation.ground_truth at the synthetic/ground_truth folder `lmlm run` wrote")
    facts: dict[str, dict[str, str]] = {}
    types: dict[str, str] = {}
    for row in pq.read_table(paths["kb"]).to_pylist():
        facts.setdefault(row["entity"], {})[row["relation"]] = row["value"]
        types[row["entity"]] = row["entity_type"]
    people = [(r["entity"], r["biography_doc_id"]) for r in pq.read_table(paths["people"]).to_pylist()]
    aliases = {normalize_key(r["alias"]): r["entity"] for r in pq.read_table(paths["aliases"]).to_pylist()}
    return GroundTruth(facts, types, people, aliases)


def sample_people(gt: GroundTruth, n: int, seed: int, exclude_doc=lambda doc_id: False) -> list[str]:
    """``n`` people (seeded), skipping those whose biography ``exclude_doc`` rejects (e.g. held out of training)."""
    pool = [p for p, doc in gt.people if not exclude_doc(doc)]
    return random.Random(f"people/{seed}").sample(pool, min(n, len(pool)))


# ----------------------------------------------------------------------------- models


def load_checkpoint(path: str):
    """(model in eval mode, tokenizer) of a checkpoint folder that tasks.pretrain wrote."""
    from transformers import AutoModelForCausalLM

    from models.tokenizer import load_tokenizer
    from models.train import quiet_progress

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserInputError(f"checkpoint {path}: no config.json; pass a checkpoint-<step> folder that "
                             "`lmlm lmlm pretrain` (or python -m tasks.pretrain) wrote")
    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), load_tokenizer(path)


def _generate(model, tokenizer, prompts: list[str], lookup, max_new_tokens: int, batch_size: int,
              document_start: bool = False) -> list[GenerationResult]:
    """Greedy generation in batches of similar prompt length; results in prompt order. With
    ``document_start`` each prompt follows an end-of-text token, as a document's opening does in
    pretraining and perplexity scoring; else it is running text, as a packed block can start anywhere."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[GenerationResult | None] = [None] * len(prompts)
    eos = (tokenizer.eos_token or "") if document_start else ""
    for k in range(0, len(order), batch_size):
        chunk = order[k:k + batch_size]
        for i, r in zip(chunk, generate(model, tokenizer, [eos + prompts[i] for i in chunk], lookup,
                                        max_new_tokens=max_new_tokens, show_calls=True)):
            out[i] = r
    return out


# ----------------------------------------------------------------------------- perplexity


class OwnLookups(BaseModel):
    """Held-out documents with every call's value replaced by what the model's own key looked up."""

    texts: list[str]
    calls: int
    value_matches: int  # looked-up value == the gold value

    @property
    def value_accuracy(self) -> float:
        return self.value_matches / self.calls if self.calls else float("nan")


def fill_own_lookups(model, tokenizer, annotated: list[str], lookup, batch_size: int = 16,
                     max_key_tokens: int = 20) -> OwnLookups:
    """For each call of each document, let the model write the key after the gold prefix's
    ``<|db_entity|>`` (earlier values already its own), look it up, and put that value in the call;
    a key not finished in ``max_key_tokens`` or missing from the database gets ``unknown``."""
    docs = [parse(t) for t in annotated]
    values = [[pc.call.value for pc in d.calls] for d in docs]
    matches = 0
    for k in range(max((len(d.calls) for d in docs), default=0)):
        todo = [i for i, d in enumerate(docs) if len(d.calls) > k]
        prompts = []
        for i in todo:
            prefix = _with_values(docs[i], values[i], upto=k)
            prompts.append(prefix + DB_ENTITY)
        # the document as normalized_perplexity scores it: after an end-of-text token
        results = _generate(model, tokenizer, prompts, lookup, max_key_tokens, batch_size, document_start=True)
        for i, r in zip(todo, results):
            got = r.lookups[0].value if r.lookups else UNKNOWN
            matches += got == values[i][k]
            values[i][k] = got
    texts = [_with_values(d, v) for d, v in zip(docs, values)]
    return OwnLookups(texts=texts, calls=sum(len(d.calls) for d in docs), value_matches=matches)


def _with_values(doc: Annotated, values: list[str], upto: int | None = None) -> str:
    """The document rendered with ``values`` in its calls; with ``upto``, only the text before call ``upto``."""
    calls = tuple(PlacedCall(pc.offset, LookupCall(pc.call.entity, pc.call.relation, v))
                  for pc, v in zip(doc.calls, values))
    if upto is None:
        return render(Annotated(doc.text, calls))
    cut = doc.calls[upto].offset
    return render(Annotated(doc.text[:cut], calls[:upto]))


def perplexity_report(model, tokenizer, annotated: list[str], variant: str, lookup, batch_size: int = 16) -> dict:
    """Normalized perplexity on held-out documents: with the gold values (oracle) and, for an LMLM, with
    the values its own keys look up; a standard model scores the call-free text (both figures equal)."""
    if variant == "standard":
        ppl = normalized_perplexity(model, tokenizer, [strip(t) for t in annotated], lookup_calls=False)
        return {"docs": len(annotated), "oracle": ppl.normalized, "own_lookups": ppl.normalized,
                "loss_per_token": ppl.loss, "source_tokens": ppl.source_tokens}
    oracle: Perplexity = normalized_perplexity(model, tokenizer, annotated)
    own = fill_own_lookups(model, tokenizer, annotated, lookup, batch_size)
    mine = normalized_perplexity(model, tokenizer, own.texts)
    return {"docs": len(annotated), "oracle": oracle.normalized, "own_lookups": mine.normalized,
            "loss_per_token": oracle.loss, "source_tokens": oracle.source_tokens,
            "own_lookup_calls": own.calls, "own_lookup_value_accuracy": own.value_accuracy}


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


def _same(a: str | None, b: str | None) -> bool:
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
        ok = about == subject and _same(gt.value(subject, call.relation), call.value)
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
                facts[key] = AtomicFact(relation, value, _same(gt.value(subject, relation), value), "text")
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
    results = _generate(model, tokenizer, prompts, lookup, max_new_tokens, batch_size, document_start)
    per, records = [], []
    for person, p, r in zip(people, prompts, results):
        facts = extract_facts(person, p, r, gt)
        per.append(facts)
        records.append({"entity": person, "prompt": p, "text": r.text, "text_without_calls": r.text_without_calls,
                        "facts": [asdict(f) for f in facts]})
    report = factscore(per, gamma)
    report["lookup_facts_per_response"] = sum(f.source == "lookup" for fs in per for f in fs) / max(len(per), 1)
    return report, records


# ----------------------------------------------------------------------------- cloze probes


@dataclass(frozen=True)
class ClozeProbe:
    entity: str
    relation: str
    prompt: str
    gold: str


def cloze_probes(gt: GroundTruth, people: list[str], n: int, seed: int) -> list[ClozeProbe]:
    """``n`` probes (seeded) over the facts of ``people`` whose relation has a cloze template."""
    pool = [ClozeProbe(p, r, CLOZE_TEMPLATES[r].format(N=p), v)
            for p in people for r, v in gt.facts[p].items() if r in CLOZE_TEMPLATES]
    return random.Random(f"cloze/{seed}").sample(pool, min(n, len(pool)))


def _words(text: str) -> list[str]:
    """Normalised words, each without punctuation at its ends ("1987." -> "1987")."""
    return list(name_words(normalize_key(text)))


def exact_match(generated: str, gold: str) -> bool:
    """The gold value starts within the first EXACT_MATCH_WORDS generated words (words compared normalised)."""
    words, want = _words(generated), _words(gold)
    n = len(want)
    return n > 0 and any(words[i:i + n] == want for i in range(min(EXACT_MATCH_WORDS, len(words))))


def precision_at_1(generated: str, gold: str) -> bool:
    """The first generated word(s) are the gold value (a leading article skipped)."""
    text = generated.strip()
    low = text.lower()
    for article in _ARTICLES:
        if low.startswith(article) and not normalize_key(gold).startswith(article.strip()):
            text = text[len(article):]
            break
    words, want = _words(text), _words(gold)
    return bool(want) and words[:len(want)] == want


def cloze_report(model, tokenizer, probes: list[ClozeProbe], lookup, *, max_new_tokens: int, batch_size: int,
                 document_start: bool = False) -> dict:
    results = _generate(model, tokenizer, [p.prompt for p in probes], lookup, max_new_tokens, batch_size, document_start)
    em = [exact_match(r.text_without_calls, p.gold) for p, r in zip(probes, results)]
    p1 = [precision_at_1(r.text_without_calls, p.gold) for p, r in zip(probes, results)]
    n = len(probes)
    by_relation: dict[str, list[bool]] = {}
    for p, hit in zip(probes, em):
        by_relation.setdefault(p.relation, []).append(hit)
    return {"probes": n, "exact_match": sum(em) / n if n else 0.0, "precision_at_1": sum(p1) / n if n else 0.0,
            "exact_match_by_relation": {r: sum(v) / len(v) for r, v in sorted(by_relation.items())}}


# ----------------------------------------------------------------------------- edits


def copy_warehouse(path: str, folder: str) -> str:
    """A copy of the DuckDB file (and its WAL) under ``folder``, so edits never touch the original."""
    if not os.path.isfile(path):
        raise UserInputError(f"warehouse {path} not found; run `lmlm run` first or set the warehouse path")
    dest = os.path.join(folder, os.path.basename(path))
    shutil.copyfile(path, dest)
    if os.path.isfile(path + ".wal"):
        shutil.copyfile(path + ".wal", dest + ".wal")
    return dest


def edit_report(model, tokenizer, warehouse_path: str, probes: list[ClozeProbe], gt: GroundTruth, *,
                lookup_mode: str, max_new_tokens: int, batch_size: int, seed: int, document_start: bool = False) -> dict:
    """Edit the facts of ``probes`` to other values of the same relation, then delete them, in a copy of
    the warehouse, refreshing the lookup database after each; no retraining.

    Edit success: share of the facts the model produced before (cloze exact match) that show the new
    value after the edit. Unlearning: share of those whose old value is no longer produced after the delete.
    """
    from warehouse.db import connect
    from warehouse.edits import edit_fact

    others: dict[str, list[str]] = {}
    for values in gt.facts.values():
        for r, v in values.items():
            others.setdefault(r, []).append(v)
    rng = random.Random(f"edits/{seed}")
    new_values = []
    for p in probes:
        choices = sorted({v for v in others[p.relation] if not _same(v, p.gold) and not exact_match(v, p.gold)})
        new_values.append(rng.choice(choices) if choices else p.gold + " II")
    prompts = [p.prompt for p in probes]
    with tempfile.TemporaryDirectory(prefix="lmlm-edits-") as tmp:
        con = connect(copy_warehouse(warehouse_path, tmp))
        try:
            db = LookupDatabase.load(con)
            index = open_index(db, lookup_mode, embed=embed, tokenizer=tokenizer)

            def produced(values: list[str]) -> list[bool]:
                rs = _generate(model, tokenizer, prompts, index, max_new_tokens, batch_size, document_start)
                return [exact_match(r.text_without_calls, v) for r, v in zip(rs, values)]

            before = produced([p.gold for p in probes])
            t0 = time.perf_counter()
            for p, v in zip(probes, new_values):
                edit_fact(con, p.entity, p.relation, v, reason="lmlm evaluation: edit")
            db.refresh()
            edited = produced(new_values)
            for p in probes:
                edit_fact(con, p.entity, p.relation, None, reason="lmlm evaluation: unlearn")
            db.refresh()
            still = produced([p.gold for p in probes])
            edit_seconds = time.perf_counter() - t0
        finally:
            con.close()
    known = [i for i, b in enumerate(before) if b]
    return {
        "facts": len(probes), "known_before": len(known),
        "edit_success": sum(edited[i] for i in known) / len(known) if known else 0.0,
        "unlearning": sum(not still[i] for i in known) / len(known) if known else 0.0,
        "edit_success_all": sum(edited) / len(probes) if probes else 0.0,
        "seconds": edit_seconds,
    }


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


# ----------------------------------------------------------------------------- one model


def evaluate_variant(variant: str, checkpoint: str, *, holdout_annotated: list[str], lookup_source: str | None,
                     lookup_mode: str, gt: GroundTruth | None, people: list[str], probes: list[ClozeProbe],
                     edit_probes: list[ClozeProbe], warehouse_path: str | None, cfg) -> dict:
    """Every metric of one model (``cfg`` an LMLMEvaluationConfig); the standard model generates without lookups."""
    t0 = time.perf_counter()
    model, tokenizer = load_checkpoint(checkpoint)
    lookup = open_lookup(lookup_source, lookup_mode, tokenizer, embed=embed) if variant == "lmlm" and lookup_source else None
    report: dict = {"variant": variant, "checkpoint": checkpoint}
    timings = report.setdefault("seconds", {})
    s = time.perf_counter()
    report["perplexity"] = perplexity_report(model, tokenizer, holdout_annotated, variant, lookup, cfg.batch_size)
    timings["perplexity"] = time.perf_counter() - s
    logger.info("%s: normalized perplexity oracle %.3f, own lookups %.3f", variant, report["perplexity"]["oracle"],
             report["perplexity"]["own_lookups"])
    if gt is not None and people:
        s = time.perf_counter()
        report["bios"], report["bio_samples"] = bio_report(
            model, tokenizer, people, lookup, gt, prompt=cfg.bio_prompt, max_new_tokens=cfg.bio_max_new_tokens,
            gamma=cfg.length_penalty_gamma, batch_size=cfg.batch_size, document_start=cfg.document_start)
        timings["bios"] = time.perf_counter() - s
        logger.info("%s: FActScore %.3f (length penalty %.3f), %.1f facts per bio", variant,
                 report["bios"]["factscore"], report["bios"]["factscore_length_penalty"],
                 report["bios"]["facts_per_response"])
        if cfg.judge is not None:
            s = time.perf_counter()
            report["bios_llm_judge"] = judge_report(report["bio_samples"][:cfg.judge_max_responses], gt, cfg.judge,
                                                    cfg.length_penalty_gamma)
            timings["llm_judge"] = time.perf_counter() - s
    if gt is not None and probes:
        s = time.perf_counter()
        report["cloze"] = cloze_report(model, tokenizer, probes, lookup, max_new_tokens=cfg.cloze_max_new_tokens,
                                       batch_size=cfg.batch_size, document_start=cfg.document_start)
        timings["cloze"] = time.perf_counter() - s
        logger.info("%s: cloze exact match %.3f, P@1 %.3f", variant, report["cloze"]["exact_match"],
                 report["cloze"]["precision_at_1"])
    if gt is not None and edit_probes and warehouse_path:
        s = time.perf_counter()
        if variant == "lmlm":
            report["edits"] = edit_report(model, tokenizer, warehouse_path, edit_probes, gt, lookup_mode=lookup_mode,
                                          max_new_tokens=cfg.cloze_max_new_tokens, batch_size=cfg.batch_size,
                                          seed=cfg.seed, document_start=cfg.document_start)
        else:
            report["edits"] = edit_report_without_lookups(model, tokenizer, edit_probes, cfg)
        timings["edits"] = time.perf_counter() - s
        logger.info("%s: edit success %.3f, unlearning %.3f over %d known facts", variant, report["edits"]["edit_success"],
                 report["edits"]["unlearning"], report["edits"]["known_before"])
    timings["total"] = time.perf_counter() - t0
    return report


def edit_report_without_lookups(model, tokenizer, probes: list[ClozeProbe], cfg) -> dict:
    """The standard model has no database to edit: its answers after an "edit" are its answers before."""
    rs = _generate(model, tokenizer, [p.prompt for p in probes], None, cfg.cloze_max_new_tokens, cfg.batch_size,
                   cfg.document_start)
    before = [exact_match(r.text_without_calls, p.gold) for p, r in zip(probes, rs)]
    return {"facts": len(probes), "known_before": sum(before), "edit_success": 0.0,
            "unlearning": 0.0, "edit_success_all": 0.0, "seconds": 0.0,
            "note": "no lookup database: edits and deletes need retraining"}


# its inputs (a ground truth of thousands of facts) are not worth hashing for a cache key


def comparison_rows(reports: dict[str, dict]) -> list[dict]:
    """One row per metric, one column per variant: the side-by-side table."""
    metrics = [
        ("normalized perplexity (oracle lookups)", ("perplexity", "oracle")),
        ("normalized perplexity (own lookups)", ("perplexity", "own_lookups")),
        ("FActScore", ("bios", "factscore")),
        ("FActScore, length penalty", ("bios", "factscore_length_penalty")),
        ("facts per bio", ("bios", "facts_per_response")),
        ("FActScore, LLM judge", ("bios_llm_judge", "factscore")),
        ("cloze exact match", ("cloze", "exact_match")),
        ("cloze precision@1", ("cloze", "precision_at_1")),
        ("edit success", ("edits", "edit_success")),
        ("unlearning", ("edits", "unlearning")),
    ]
    rows = []
    for name, (section, key) in metrics:
        values = {v: r.get(section, {}).get(key) for v, r in reports.items()}
        if all(x is None for x in values.values()):
            continue
        rows.append({"metric": name, **{v: (round(x, 3) if isinstance(x, float) else x) for v, x in values.items()}})
    return rows
