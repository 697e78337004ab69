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
from collections.abc import Callable
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
from models.lmlm import Perplexity, load_lmlm, normalized_perplexity, text_logprobs
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
from tasks.minimal_pairs import FIELD_COHERENCE, PHENOMENA, minimal_pair_report

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
                lookup_mode: str, max_new_tokens: int, batch_size: int, seed: int, document_start: bool = False,
                uses_database: bool = True, latency_probes: int = 10) -> dict:
    """Edit the facts of ``probes`` to other values of the same relation, then delete them, in a copy of the
    warehouse, refreshing the lookup database after each; no retraining. The same generation probes run before,
    after the edit and after the delete, whether or not the model reads the database (``uses_database``: the
    standard model cannot, so what it produces after the edit is measured, not assumed).

    Edit success: share of the facts the model produced before (cloze exact match) that show the new value after
    the edit. Unlearning: share of those whose old value is no longer produced after the delete. Latency: for the
    first ``latency_probes`` facts, edited one at a time, seconds from the warehouse write to the end of the next
    generation of that fact's probe, over the edits that generation showed (how many did: ``latency_seen``).
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
            index = open_index(db, lookup_mode, embed=embed, tokenizer=tokenizer) if uses_database else None

            def produced(values: list[str], which: list[int]) -> list[bool]:
                rs = generate_batched(model, tokenizer, [prompts[i] for i in which], index, max_new_tokens,
                                      batch_size, document_start)
                return [exact_match(r.text_without_calls, values[i]) for i, r in zip(which, rs)]

            everything = list(range(len(probes)))
            before = produced([p.gold for p in probes], everything)
            timed = min(latency_probes, len(probes))
            latencies = []  # of the edits the next generation showed
            for i in range(timed):  # one at a time: write, refresh, generate
                t = time.perf_counter()
                edit_fact(con, probes[i].entity, probes[i].relation, new_values[i], reason="lmlm evaluation: edit")
                db.refresh()
                if produced(new_values, [i])[0]:
                    latencies.append(time.perf_counter() - t)
            t0 = time.perf_counter()
            for p, v in list(zip(probes, new_values))[timed:]:
                edit_fact(con, p.entity, p.relation, v, reason="lmlm evaluation: edit")
            db.refresh()
            edited = produced(new_values, everything)
            for p in probes:
                edit_fact(con, p.entity, p.relation, None, reason="lmlm evaluation: unlearn")
            db.refresh()
            still = produced([p.gold for p in probes], everything)
            edit_seconds = time.perf_counter() - t0
        finally:
            con.close()
    known = [i for i, b in enumerate(before) if b]
    latencies.sort()
    return {
        "facts": len(probes), "known_before": len(known), "uses_database": uses_database,
        "edit_success": sum(edited[i] for i in known) / len(known) if known else 0.0,
        "unlearning": sum(not still[i] for i in known) / len(known) if known else 0.0,
        "edit_success_all": sum(edited) / len(probes) if probes else 0.0,
        "seconds": edit_seconds,
        # write -> refresh -> the next generation of the edited fact's probe, one fact at a time; the latency
        # figures are over the edits that generation showed (none for a model that reads no database)
        "latency_probes": timed, "latency_seen": len(latencies),
        "latency_median_s": latencies[len(latencies) // 2] if latencies else None,
        "latency_max_s": latencies[-1] if latencies else None,
        **({} if uses_database else {"note": "reads no database: an edit or delete needs retraining; the figures are "
                                             "what it produced after the database changed"}),
    }


# ----------------------------------------------------------------------------- one model


def evaluate_variant(variant: str, checkpoint: str, *, holdout_annotated: list[str], lookup_source: str | None,
                     lookup_mode: str, gt: GroundTruth | None, people: list[str], probes: list[ClozeProbe],
                     edit_probes: list[ClozeProbe], warehouse_path: str | None, cfg,
                     seen: Callable[[str], bool] | None = None) -> dict:
    """Every metric of one model (``cfg`` an LMLMEvaluationConfig); the standard model generates without lookups.
    ``seen``: whether a sentence occurs in the training text (minimal pairs are drawn from the rest)."""
    t0 = time.perf_counter()
    model, tokenizer = load_lmlm(checkpoint)
    lookup = open_lookup(lookup_source, lookup_mode, tokenizer, embed=embed) if variant == "lmlm" and lookup_source else None
    report: dict = {"variant": variant, "checkpoint": checkpoint}
    timings = report.setdefault("seconds", {})
    s = time.perf_counter()
    report["perplexity"] = perplexity_report(model, tokenizer, holdout_annotated, variant, lookup, cfg.batch_size)
    timings["perplexity"] = time.perf_counter() - s
    progress.update(f"evaluate {variant}", len(timings), 5, "metrics")
    logger.info("%s: normalized perplexity oracle %.3f, own lookups %.3f", variant, report["perplexity"]["oracle"],
             report["perplexity"]["own_lookups"])
    if gt is not None and people:
        s = time.perf_counter()
        report["bios"], report["bio_samples"] = bio_report(
            model, tokenizer, people, lookup, gt, prompt=cfg.bio_prompt, max_new_tokens=cfg.bio_max_new_tokens,
            gamma=cfg.length_penalty_gamma, batch_size=cfg.batch_size, document_start=cfg.document_start)
        timings["bios"] = time.perf_counter() - s
        progress.update(f"evaluate {variant}", len(timings), 5, "metrics")
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
        progress.update(f"evaluate {variant}", len(timings), 5, "metrics")
        logger.info("%s: cloze exact match %.3f, P@1 %.3f", variant, report["cloze"]["exact_match"],
                 report["cloze"]["precision_at_1"])
    if gt is not None and edit_probes and warehouse_path:
        s = time.perf_counter()
        report["edits"] = edit_report(model, tokenizer, warehouse_path, edit_probes, gt, lookup_mode=lookup_mode,
                                      max_new_tokens=cfg.cloze_max_new_tokens, batch_size=cfg.batch_size,
                                      seed=cfg.seed, document_start=cfg.document_start,
                                      uses_database=variant == "lmlm", latency_probes=cfg.edit_latency_probes)
        timings["edits"] = time.perf_counter() - s
        progress.update(f"evaluate {variant}", len(timings), 5, "metrics")
        logger.info("%s: edit success %.3f, unlearning %.3f over %d known facts", variant, report["edits"]["edit_success"],
                 report["edits"]["unlearning"], report["edits"]["known_before"])
    if gt is not None and cfg.minimal_pairs:
        s = time.perf_counter()
        own_format = (lambda texts: text_logprobs(model, tokenizer, texts, lookup_calls=True,
                                                  batch_size=2 * cfg.batch_size)) if variant == "lmlm" else None
        report["minimal_pairs"] = minimal_pair_report(
            gt, lambda texts: text_logprobs(model, tokenizer, texts, batch_size=2 * cfg.batch_size),
            n_per_phenomenon=cfg.minimal_pairs, draws=cfg.minimal_pair_draws, seed=cfg.seed,
            seen=seen or (lambda sentence: False), markup_logprob=own_format)
        timings["minimal_pairs"] = time.perf_counter() - s
        progress.update(f"evaluate {variant}", len(timings), 5, "metrics")
        logger.info("%s: minimal pairs %.3f ± %.3f over %d draws", variant, report["minimal_pairs"]["accuracy"],
                    report["minimal_pairs"]["accuracy_std"], cfg.minimal_pair_draws)
    timings["total"] = time.perf_counter() - t0
    return report


# (metric, where in a variant's report, how many decimals); absent everywhere: the row is left out
COMPARISON_METRICS: list[tuple[str, tuple[str, ...], int]] = [
    ("normalized perplexity (its database's values)", ("perplexity", "oracle"), 3),
    ("normalized perplexity (own lookups)", ("perplexity", "own_lookups"), 3),
    ("FActScore (visible text, all bios)", ("bios", "factscore"), 3),
    ("FActScore, length penalty (gamma 10)", ("bios", "factscore_length_penalty"), 3),
    ("FActScore over bios stating a fact", ("bios", "factscore_responded"), 3),
    ("share of bios stating a fact", ("bios", "responded_share"), 3),
    ("facts per bio", ("bios", "facts_per_response"), 2),
    ("lookups per bio", ("bios", "lookups_per_response"), 2),
    ("lookup precision", ("bios", "lookup_precision"), 3),
    ("lookups copied correctly", ("bios", "lookup_copied"), 3),
    ("FActScore, LLM judge", ("bios_llm_judge", "factscore"), 3),
    ("cloze exact match", ("cloze", "exact_match"), 3),
    ("cloze precision@1", ("cloze", "precision_at_1"), 3),
    ("edit success", ("edits", "edit_success"), 3),
    ("unlearning", ("edits", "unlearning"), 3),
    ("edit latency, median s (write -> next generation)", ("edits", "latency_median_s"), 3),
    ("minimal pairs, plain text, all four", ("minimal_pairs", "accuracy"), 3),
    *[(f"minimal pairs, plain text, {p.replace('_', ' ')}", ("minimal_pairs", "by_phenomenon", p, "mean"), 3)
      for p in PHENOMENA],
    ("minimal pairs, LMLM's own format (calls before values), all four", ("minimal_pairs", "with_lookups", "accuracy"), 3),
    *[(f"minimal pairs, own format, {p.replace('_', ' ')}", ("minimal_pairs", "with_lookups", "by_phenomenon", p, "mean"), 3)
      for p in PHENOMENA],
    ("minimal pairs, plain text, field coherence (looked-up values)",
     ("minimal_pairs", "by_phenomenon", FIELD_COHERENCE, "mean"), 3),
]


def _at(report: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def comparison_rows(runs: dict[int, dict[str, dict]]) -> list[dict]:
    """One row per metric, one column per variant (and ``<variant>_std``, ``<variant>_n``): the mean over the seeds
    of ``runs`` (seed -> variant -> evaluate_variant's report) that have the variant, and the standard deviation over
    them (``spread``: "seeds"; none for a variant with one seed). With one seed in all, the minimal pairs' deviation
    is over their draws ("draws") and the others have none."""
    import statistics

    variants = list(dict.fromkeys(v for by in runs.values() for v in by))
    several = len(runs) > 1
    only = next(iter(runs.values()))
    rows = []
    for name, path, digits in COMPARISON_METRICS:
        draws = path[0] == "minimal_pairs"  # one run: the minimal pairs' spread is over their draws
        std_path = (path[:-1] + ("std",)) if path[-1] == "mean" else (*path[:-1], "accuracy_std")
        row: dict = {"metric": name}
        for v in variants:
            values = [x for by in runs.values() if (x := _at(by.get(v, {}), path)) is not None]
            std = None
            if len(values) > 1:
                std = statistics.stdev(values)
            elif values and not several and draws:
                std = _at(only.get(v, {}), std_path)
            row[v] = round(statistics.fmean(values), digits) if values else None
            row[f"{v}_std"] = None if std is None else round(std, digits)
            row[f"{v}_n"] = len(values)
        if all(row[v] is None for v in variants):
            continue
        row["spread"] = "seeds" if several else ("draws" if draws else None)
        row["n"] = len(runs) if several else (_at(only[variants[0]], ("minimal_pairs", "draws")) if draws else 1)
        rows.append(row)
    return rows
