"""Evaluating an LMLM against its standard baseline: normalized perplexity (oracle and own lookups),
FActScore-style factual precision of bios, T-REx/LAMA-style cloze probes, fact editing and unlearning
through the warehouse, and FActScore with an LLM judge.

Plain functions over a model, its tokenizer, a lookup index and the synthetic ground truth
(``tasks/synthetic``: kb, people, aliases); the flow in ``flows/lmlm.py`` decides where they run.
FActScore lives in ``tasks/factscore.py``, the ground truth in ``tasks/ground_truth.py``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass

from pydantic import BaseModel

from lookup import (
    UNKNOWN,
    LookupDatabase,
    name_words,
    normalize_key,
    open_index,
    open_lookup,
)
from models.embed import embed
from models.generate import generate_batched
from models.lmlm import Perplexity, load_lmlm, normalized_perplexity
from schemas import progress
from schemas.errors import UserInputError
from schemas.markup import (
    DB_ENTITY,
    Annotated,
    LookupCall,
    PlacedCall,
    parse,
    render,
    strip,
)
from tasks.factscore import bio_report, judge_report, same_value
from tasks.ground_truth import GroundTruth

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
        results = generate_batched(model, tokenizer, prompts, lookup, max_key_tokens, batch_size, document_start=True)
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
    results = generate_batched(model, tokenizer, [p.prompt for p in probes], lookup, max_new_tokens, batch_size, document_start)
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
        choices = sorted({v for v in others[p.relation] if not same_value(v, p.gold) and not exact_match(v, p.gold)})
        new_values.append(rng.choice(choices) if choices else p.gold + " II")
    prompts = [p.prompt for p in probes]
    with tempfile.TemporaryDirectory(prefix="lmlm-edits-") as tmp:
        con = connect(copy_warehouse(warehouse_path, tmp))
        try:
            db = LookupDatabase.load(con)
            index = open_index(db, lookup_mode, embed=embed, tokenizer=tokenizer)

            def produced(values: list[str]) -> list[bool]:
                rs = generate_batched(model, tokenizer, prompts, index, max_new_tokens, batch_size, document_start)
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


# ----------------------------------------------------------------------------- one model


def evaluate_variant(variant: str, checkpoint: str, *, holdout_annotated: list[str], lookup_source: str | None,
                     lookup_mode: str, gt: GroundTruth | None, people: list[str], probes: list[ClozeProbe],
                     edit_probes: list[ClozeProbe], warehouse_path: str | None, cfg) -> dict:
    """Every metric of one model (``cfg`` an LMLMEvaluationConfig); the standard model generates without lookups."""
    t0 = time.perf_counter()
    model, tokenizer = load_lmlm(checkpoint)
    lookup = open_lookup(lookup_source, lookup_mode, tokenizer, embed=embed) if variant == "lmlm" and lookup_source else None
    report: dict = {"variant": variant, "checkpoint": checkpoint}
    timings = report.setdefault("seconds", {})
    s = time.perf_counter()
    report["perplexity"] = perplexity_report(model, tokenizer, holdout_annotated, variant, lookup, cfg.batch_size)
    timings["perplexity"] = time.perf_counter() - s
    progress.update(f"evaluate {variant}", len(timings), 4, "metrics")
    logger.info("%s: normalized perplexity oracle %.3f, own lookups %.3f", variant, report["perplexity"]["oracle"],
             report["perplexity"]["own_lookups"])
    if gt is not None and people:
        s = time.perf_counter()
        report["bios"], report["bio_samples"] = bio_report(
            model, tokenizer, people, lookup, gt, prompt=cfg.bio_prompt, max_new_tokens=cfg.bio_max_new_tokens,
            gamma=cfg.length_penalty_gamma, batch_size=cfg.batch_size, document_start=cfg.document_start)
        timings["bios"] = time.perf_counter() - s
        progress.update(f"evaluate {variant}", len(timings), 4, "metrics")
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
        progress.update(f"evaluate {variant}", len(timings), 4, "metrics")
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
        progress.update(f"evaluate {variant}", len(timings), 4, "metrics")
        logger.info("%s: edit success %.3f, unlearning %.3f over %d known facts", variant, report["edits"]["edit_success"],
                 report["edits"]["unlearning"], report["edits"]["known_before"])
    timings["total"] = time.perf_counter() - t0
    return report


def edit_report_without_lookups(model, tokenizer, probes: list[ClozeProbe], cfg) -> dict:
    """The standard model has no database to edit: its answers after an "edit" are its answers before."""
    rs = generate_batched(model, tokenizer, [p.prompt for p in probes], None, cfg.cloze_max_new_tokens, cfg.batch_size,
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
