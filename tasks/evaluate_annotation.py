"""Scoring an annotator against gold annotations: triplet and span precision/recall.

A triplet is (doc_id, entity, relation, value); a span adds where the call sits (``call_offset`` or the
value's ``value_start``, the same for both sides). Both are compared as multisets, so a fact stated twice
in a document counts twice.
"""

from __future__ import annotations

import posixpath
from collections import Counter

from schemas import markup
from tasks.shardio import read_table

Scored = tuple[str, str, str, str, int | None]  # (doc_id, entity, relation, value, call_offset | value_start)


def _prf(predicted: Counter, gold: Counter) -> tuple[float, float, float]:
    hit = sum((predicted & gold).values())
    n_pred, n_gold = sum(predicted.values()), sum(gold.values())
    precision = hit / n_pred if n_pred else 1.0
    recall = hit / n_gold if n_gold else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score_triplets(predicted: list[Scored], gold: list[Scored]) -> dict:
    """Precision, recall and F1 of triplets, and of triplets at their position (span_*).

    An empty prediction has precision 1 and an empty gold recall 1 (nothing was wrong / nothing missed).
    """
    p, r, f = _prf(Counter(t[:4] for t in predicted), Counter(t[:4] for t in gold))
    sp, sr, sf = _prf(Counter(tuple(t[:5]) for t in predicted), Counter(tuple(t[:5]) for t in gold))
    return {"precision": p, "recall": r, "f1": f, "span_precision": sp, "span_recall": sr, "span_f1": sf,
            "n_predicted": len(predicted), "n_gold": len(gold)}


def scored_calls(doc_id: str, ann) -> list[Scored]:
    """(doc_id, entity, relation, value, call_offset) for every call of a :class:`markup.Annotated`."""
    return [(doc_id, pc.call.entity, pc.call.relation, pc.call.value, pc.offset) for pc in ann.calls]


def score_against_gold(annotated_shards: list[str], ground_truth_dir: str, exclude: list[str] = ()) -> dict:
    """Triplet and span P/R/F1 of annotated shards against the synthetic corpus's gold annotations, over
    the documents the gold knows that are not in the ``exclude`` shards (e.g. the seed an annotator was
    trained on); ``documents`` counts them and ``source_preserved_rate`` is the share whose stripped
    annotation equals the source text."""
    skip = {d for s in exclude for d in read_table(s, ["doc_id"]).column("doc_id").to_pylist()}
    gold = {r["doc_id"]: r["annotated_text"] for r in
            read_table(posixpath.join(ground_truth_dir, "annotated.parquet"), ["doc_id", "annotated_text"]).to_pylist()}
    predicted, expected, n, preserved = [], [], 0, 0
    for shard in annotated_shards:
        for r in read_table(shard, ["doc_id", "text", "annotated_text"]).to_pylist():
            if r["doc_id"] in skip or r["doc_id"] not in gold:
                continue
            n += 1
            preserved += markup.strip(r["annotated_text"]) == r["text"]
            predicted += scored_calls(r["doc_id"], markup.parse(r["annotated_text"]))
            expected += scored_calls(r["doc_id"], markup.parse(gold[r["doc_id"]]))
    return {**score_triplets(predicted, expected), "documents": n,
            "source_preserved_rate": preserved / n if n else None}


def normalize_field(s: str) -> str:
    """A call field as the real-text figures compare it: lower case, whitespace runs as one space."""
    return " ".join(s.lower().split())


def score_levels(predicted: list[Scored], gold: list[Scored]) -> dict:
    """P/R/F1 of (entity, relation, value) triplets, (entity, value) pairs and values, fields case- and
    whitespace-normalized, compared as multisets per document (``triplet_f1``, ``entity_value_f1``, ``value_f1``...)."""
    out = {}
    for level, fields in (("triplet", (1, 2, 3)), ("entity_value", (1, 3)), ("value", (3,))):
        def key(t: Scored) -> tuple:
            return (t[0], *(normalize_field(t[k]) for k in fields))

        p, r, f = _prf(Counter(map(key, predicted)), Counter(map(key, gold)))
        out.update({f"{level}_precision": p, f"{level}_recall": r, f"{level}_f1": f})
    return out
