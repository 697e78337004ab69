"""Realignment: map the lookup calls of an annotator's inline-markup output, whose stripped text drifted
from the source (whitespace, altered words, truncation, added or removed text), back onto the exact source.

Calls in unchanged stretches keep their place; a call in a changed stretch moves to its value's mention
nearby (found as :mod:`tasks.align` finds mentions) or is dropped and counted. The source text is never
altered: the result is a :class:`markup.Annotated` over it.
"""

from __future__ import annotations

import difflib
from collections import Counter

from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein

from schemas import markup
from tasks.align import FUZZY_RATIO, call_offset, first_non_space, mention_at, value_mentions

_MIN_ANCHOR_BLOCK = 3  # equal runs shorter than this inside changed text are coincidences, not alignment
_ALIGN_CELLS_MAX = 400_000_000  # above this (len x len of the drifted middle) use difflib, not a full matrix


def _equal_blocks(source: str, drifted: str) -> list[tuple[int, int, int]]:
    """Equal runs as (drifted_start, drifted_end, source_start), in order."""
    prefix = 0
    limit = min(len(source), len(drifted))
    while prefix < limit and source[prefix] == drifted[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and source[-1 - suffix] == drifted[-1 - suffix]:
        suffix += 1
    s_mid, d_mid = source[prefix:len(source) - suffix], drifted[prefix:len(drifted) - suffix]
    blocks = [(0, prefix, 0)] if prefix else []
    if len(s_mid) * len(d_mid) <= _ALIGN_CELLS_MAX:
        ops = [(op.tag, op.src_start, op.src_end, op.dest_start, op.dest_end)
               for op in Levenshtein.opcodes(s_mid, d_mid)]
    else:  # a full edit matrix would not fit in memory; difflib's matching blocks are good enough here
        ops = difflib.SequenceMatcher(None, s_mid, d_mid, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            blocks.append((prefix + j1, prefix + j2, prefix + i1))
    if suffix:
        blocks.append((len(drifted) - suffix, len(drifted), len(source) - suffix))
    merged: list[tuple[int, int, int]] = []
    for b in blocks:  # join runs that continue each other on both sides
        if merged and merged[-1][1] == b[0] and merged[-1][2] + (merged[-1][1] - merged[-1][0]) == b[2]:
            merged[-1] = (merged[-1][0], b[1], merged[-1][2])
        elif b[1] > b[0]:
            merged.append(b)
    return merged


def _map_position(blocks: list[tuple[int, int, int]], j: int, drifted_len: int, source_len: int) -> int | None:
    """Source position of drifted position ``j`` when it lies in a trustworthy equal run, else None."""
    if j >= drifted_len:  # end of text: maps only if both texts end in the same equal run
        if blocks and blocks[-1][1] == drifted_len and blocks[-1][2] + blocks[-1][1] - blocks[-1][0] == source_len:
            return source_len
        return None
    for d0, d1, s0 in blocks:
        if d0 <= j < d1:
            if d1 - d0 < _MIN_ANCHOR_BLOCK and not (d0 == 0 or d1 == drifted_len):
                return None
            return s0 + (j - d0)
    return None


def _changed_region(blocks: list[tuple[int, int, int]], j: int, source_len: int) -> tuple[int, int]:
    """The source range lying between the equal runs around drifted position ``j``."""
    lo, hi = 0, source_len
    for d0, d1, s0 in blocks:
        if d1 <= j:
            lo = s0 + (d1 - d0)
        elif d0 > j:
            hi = s0
            break
    return lo, hi


def _unescape_legacy(s: str) -> str:
    return s.replace("\\'", "'").replace('\\"', '"')


def realign(source: str, annotated_text: str, legacy: bool = False,
            ratio: float = FUZZY_RATIO) -> tuple[markup.Annotated, dict]:
    """The calls of ``annotated_text`` placed on ``source`` exactly (``result.text == source``).

    A call is anchored on the first non-space character after it. Anchors in an unchanged stretch map
    straight across; a call whose value followed it in the model's text must find that value at the
    mapped place (else it is searched for near there: "moved"; else "dropped_lost_mention"). A call
    anchored in changed text moves to its value's mention nearby in the source, or is dropped
    ("dropped_changed_region"). Calls the grammar rejects are "dropped_malformed". Counts:
    kept (calls in the result), moved, dropped_changed_region, dropped_lost_mention, dropped_malformed.
    Legacy quote escapes (``\\'``) in fields are undone.
    """
    parsed, errors = markup.parse_lenient(annotated_text, legacy=legacy)
    counts = Counter(kept=0, moved=0, dropped_changed_region=0, dropped_lost_mention=0,
                     dropped_malformed=len(errors))
    calls = []
    for pc in parsed.calls:
        call = pc.call
        if legacy:
            try:
                call = markup.LookupCall(*(_unescape_legacy(x).strip() for x in (call.entity, call.relation, call.value)))
            except markup.MarkupError:
                counts["dropped_malformed"] += 1
                continue
        calls.append(markup.PlacedCall(pc.offset, call))
    drifted = parsed.text
    if drifted == source:
        counts["kept"] = len(calls)
        return markup.Annotated(source, tuple(calls)), dict(counts)

    blocks = _equal_blocks(source, drifted)

    def mention_survives(anchor: int, drifted_end: int, p: int) -> bool:
        """The model's mention of the value reads the same (ratio) in the source at ``p``."""
        if mention_at(source, p, value, ratio) is not None:
            return True
        q = _map_position(blocks, drifted_end - 1, len(drifted), len(source))
        return q is not None and q >= p and fuzz.ratio(drifted[anchor:drifted_end], source[p:q + 1]) >= 100 * ratio

    placed: list[markup.PlacedCall] = []
    for pc in calls:
        value = pc.call.value
        anchor = first_non_space(drifted, pc.offset)
        drifted_end = mention_at(drifted, anchor, value, ratio)
        value_follows = drifted_end is not None
        p = _map_position(blocks, anchor, len(drifted), len(source))
        if p is not None and (not value_follows or mention_survives(anchor, drifted_end, p)):
            placed.append(markup.PlacedCall(call_offset(source, p), pc.call))
            continue
        if not value_follows:
            counts["dropped_changed_region"] += 1
            continue
        # the value followed the call in the model's text: look for it where that text came from
        lo, hi = (p, p) if p is not None else _changed_region(blocks, anchor, len(source))
        window_lo, window_hi = max(0, lo - len(value) - 20), min(len(source), hi + len(value) + 20)
        spans, _ = value_mentions(source, value, window_lo, window_hi, ratio)
        if spans:
            centre = (lo + hi) / 2
            s = min(spans, key=lambda sp: abs(sp[0] - centre))[0]
            placed.append(markup.PlacedCall(call_offset(source, s), pc.call))
            counts["moved"] += 1
        else:
            counts["dropped_lost_mention" if p is not None else "dropped_changed_region"] += 1
    placed.sort(key=lambda c: c.offset)
    counts["kept"] = len(placed)
    return markup.Annotated(source, tuple(placed)), dict(counts)
