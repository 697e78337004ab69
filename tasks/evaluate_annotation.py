"""Scoring an annotator against gold annotations: triplet and span precision/recall.

A triplet is (doc_id, entity, relation, value); a span adds where the call sits (``call_offset`` or the
value's ``value_start``, the same for both sides). Both are compared as multisets, so a fact stated twice
in a document counts twice.
"""

from __future__ import annotations

from collections import Counter

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
