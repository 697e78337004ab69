"""Fact placement: put lookup calls on the exact source text.

Two jobs share the same mention finder (this module):

- :func:`place_facts` inserts one call per (entity, relation, value) fact right before the value's
  mention, at an occurrence after the entity is introduced (distant supervision).
- :func:`tasks.realign.realign` maps the calls of a model's inline-markup output, whose stripped text
  drifted from the source (whitespace, altered words, truncation, added or removed text), back onto it.

Mentions are found exactly, then case-insensitively, then fuzzily (Levenshtein ratio >= 0.9, the
reference annotators' rule); exact and case-insensitive matches never start or end inside a word.
The source text is never altered: every result is a :class:`markup.Annotated` over it.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from functools import lru_cache

from pydantic import BaseModel
from rapidfuzz import fuzz

from schemas import markup

FUZZY_RATIO = 0.9  # the reference's placement rule
_TOKEN_RE = re.compile(r"\S+")
_EDGE_PUNCT = "\"'“”‘’()[]{}<>.,;:!?«»"


class Fact(BaseModel):
    """A triplet to place; ``mention`` is its surface form in the text when it differs from ``value``."""

    entity: str
    relation: str
    value: str
    mention: str | None = None


# ---- mentions ---------------------------------------------------------------------------------


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def bounded(text: str, start: int, end: int) -> bool:
    """True when ``text[start:end]`` does not start or end in the middle of a word."""
    if start > 0 and _word_char(text[start]) and _word_char(text[start - 1]):
        return False
    if end < len(text) and _word_char(text[end - 1]) and _word_char(text[end]):
        return False
    return True


@lru_cache(maxsize=4096)
def _needle_re(needle: str, ignore_case: bool) -> re.Pattern:
    # any run of whitespace (newline, no-break space) in the text matches a space in the needle
    pattern = r"\s+".join(re.escape(part) for part in needle.split())
    return re.compile(pattern, re.IGNORECASE if ignore_case else 0)


_IRREGULAR_SPACE_RE = re.compile(r"\s{2,}|[^\S ]")


@lru_cache(maxsize=64)
def _search_view(text: str, ignore_case: bool) -> tuple[str, range | list[int]] | None:
    """``text`` with every whitespace run as one space (lower-cased for ``ignore_case``), and the source
    offset of each of its characters; None when lower-casing would change a length (then use a regex)."""
    folded = text.lower() if ignore_case else text
    if len(folded) != len(text):
        return None
    if not _IRREGULAR_SPACE_RE.search(text):
        return folded, range(len(text))
    hay, starts, pos = [], [], 0
    for m in _IRREGULAR_SPACE_RE.finditer(text):
        hay += [folded[pos:m.start()], " "]
        starts.extend(range(pos, m.start()))
        starts.append(m.start())
        pos = m.end()
    hay.append(folded[pos:])
    starts.extend(range(pos, len(text)))
    return "".join(hay), starts


def _plain_needle(needle: str, ignore_case: bool) -> str | None:
    folded = needle.lower() if ignore_case else needle
    return folded if len(folded) == len(needle) and needle == " ".join(needle.split()) else None


def exact_mentions(text: str, needle: str, start: int = 0, end: int | None = None,
                   ignore_case: bool = False) -> list[tuple[int, int]]:
    """Word-bounded occurrences of ``needle`` in ``text[start:end]`` (overlaps allowed); whitespace in
    ``needle`` matches any run of whitespace."""
    end = len(text) if end is None else end
    out = []
    view, plain = _search_view(text, ignore_case), _plain_needle(needle, ignore_case)
    if view is not None and plain:  # the common case: str.find, no pattern compiled per name
        hay, starts = view
        pos, stop = bisect_left(starts, start), bisect_left(starts, end)
        while (pos := hay.find(plain, pos, stop)) != -1:
            s, e = starts[pos], starts[pos + len(plain) - 1] + 1
            if bounded(text, s, e):
                out.append((s, e))
            pos += 1
        return out
    pos, rx = start, _needle_re(needle, ignore_case)
    while m := rx.search(text, pos, end):
        if m.end() > m.start() and bounded(text, m.start(), m.end()):
            out.append((m.start(), m.end()))
        pos = m.start() + 1
    return out


def _trim_punct(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and text[s] in _EDGE_PUNCT:
        s += 1
    while e > s and text[e - 1] in _EDGE_PUNCT:
        e -= 1
    return s, e


def fuzzy_mentions(text: str, needle: str, start: int = 0, end: int | None = None,
                   ratio: float = FUZZY_RATIO) -> list[tuple[int, int]]:
    """Spans of whole words in ``text[start:end]`` whose Levenshtein ratio to ``needle`` is >= ``ratio``.

    Non-overlapping, left to right; at each starting word the best-scoring window is taken. A window
    that only adds letters to the needle (an inflection) is not a mention of it.
    """
    end = len(text) if end is None else end
    # a window within ``ratio`` implies a needle-long stretch within about ratio - 0.15: skip texts without one
    if not fuzz.partial_ratio(needle, text[start:end], score_cutoff=max(0.0, 100 * ratio - 20)):
        return []
    tokens = [(m.start(), m.end()) for m in _TOKEN_RE.finditer(text, start, end)]
    n = max(1, len(needle.split()))
    cutoff = 100 * ratio
    # a ratio >= 0.9 bounds the candidate's length to within ~20% of the needle's
    lo, hi = int(len(needle) * 0.8), int(len(needle) * 1.25) + 2
    out: list[tuple[int, int]] = []
    last_end = start
    for i in range(len(tokens)):
        if tokens[i][0] < last_end:
            continue
        best, best_span = 0.0, None
        for k in range(max(1, n - 1), n + 2):
            if i + k > len(tokens):
                break
            s, e = _trim_punct(text, tokens[i][0], tokens[i + k - 1][1])
            if not lo <= e - s <= hi:
                continue
            score = fuzz.ratio(needle, text[s:e], score_cutoff=cutoff)
            if score > best and not _inflection(needle, text[s:e]):
                best, best_span = score, (s, e)
        if best_span:
            out.append(best_span)
            last_end = best_span[1]
    return out


def _inflection(a: str, b: str) -> bool:
    """True when one string is the other plus letters at an end ("judge"/"judges", "engineer"/"engineering"):
    a different word, not a spelling variant."""
    a, b = a.casefold(), b.casefold()
    short, long = sorted((a, b), key=len)
    return short != long and (long.startswith(short) or long.endswith(short))


def value_mentions(text: str, needle: str, start: int = 0, end: int | None = None,
                   ratio: float = FUZZY_RATIO) -> tuple[list[tuple[int, int]], str | None]:
    """Mentions of ``needle`` in the first tier that has any: exact, case-insensitive, fuzzy.

    Returns the spans and the tier's name ("exact", "ignore_case", "fuzzy"), or ([], None).
    """
    for tier in ("exact", "ignore_case"):
        spans = exact_mentions(text, needle, start, end, ignore_case=tier == "ignore_case")
        if spans:
            return spans, tier
    spans = fuzzy_mentions(text, needle, start, end, ratio)
    return (spans, "fuzzy") if spans else ([], None)


def mention_at(text: str, pos: int, needle: str, ratio: float = FUZZY_RATIO) -> int | None:
    """End of a mention of ``needle`` starting exactly at ``pos`` (exact, case-insensitive, or the
    best-scoring fuzzy end), or None."""
    for ignore_case in (False, True):
        plain = _plain_needle(needle, ignore_case)
        if plain and " " not in plain:  # one word: compare directly, no pattern to compile
            found = text[pos:pos + len(plain)]
            if (found.lower() if ignore_case else found) == plain:
                return pos + len(plain)
        elif m := _needle_re(needle, ignore_case).match(text, pos):
            return m.end()
    best, best_end = 100 * ratio, None
    for length in range(int(len(needle) * 0.8), int(len(needle) * 1.25) + 2):
        e = _trim_punct(text, pos, min(pos + length, len(text)))[1]
        score = fuzz.ratio(needle, text[pos:e]) if e > pos else 0.0
        if score > best or (score == best and best_end is None):
            best, best_end = score, e
    return best_end


def call_offset(text: str, mention_start: int) -> int:
    """Where a call for a mention starting at ``mention_start`` goes: before the whitespace preceding it."""
    while mention_start > 0 and text[mention_start - 1].isspace():
        mention_start -= 1
    return mention_start


def first_non_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


# ---- entity surface forms ---------------------------------------------------------------------


def surface_forms(entity: str, aliases_of: dict[str, set[str]] | None = None) -> set[str]:
    """Names under which ``entity`` may be introduced: itself, its aliases, and Wikipedia-title variants
    ("Arsenal_F.C." <-> "Arsenal F.C.", "Cork (city)" -> "Cork", "Punjab, Pakistan" -> "Punjab")."""
    names = {entity} | (aliases_of or {}).get(entity, set())
    for name in list(names):
        spaced = name.replace("_", " ")
        names.update((spaced, spaced.replace(" ", "_")))
        bare = re.sub(r"\s*\([^()]*\)$", "", spaced)
        names.add(bare)
        if "," in bare:
            names.add(bare.split(",", 1)[0])
    return {n.strip() for n in names if n.strip()}


def entity_mentions(text: str, names: set[str]) -> list[tuple[int, int]]:
    """Word-bounded occurrences of any of ``names`` (exact case, then case-insensitive when none)."""
    for ignore_case in (False, True):
        spans = sorted({s for n in names for s in exact_mentions(text, n, ignore_case=ignore_case)})
        if spans:
            return spans
    return []


def reverse_aliases(aliases: dict[str, str] | None) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for alias, canonical in (aliases or {}).items():
        out.setdefault(canonical, set()).add(alias)
    return out


# ---- fact placement ---------------------------------------------------------------------------

_SENTENCE_GAP_RE = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])|\n\s*\n")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "col", "lt", "sgt", "capt", "gov",
                  "rev", "no", "vs", "etc", "inc", "ltd", "co", "corp", "mt", "ft", "jan", "feb", "mar", "apr",
                  "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "u.s", "e.g", "i.e"}


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Sentence boundaries: after . ! ? and a space before a capital or digit, and at blank lines;
    not after an initial ("N.") or a common abbreviation ("Dr.", "St.")."""
    spans, start = [], 0
    for m in _SENTENCE_GAP_RE.finditer(text):
        if "\n\n" not in m.group(0).replace("\r", ""):
            word = text[:m.start()].rstrip("\"'”’)]").rsplit(None, 1)[-1].rstrip(".!?").lower() if m.start() else ""
            if (len(word) == 1 and word.isalpha()) or word in _ABBREVIATIONS:
                continue
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [sp for sp in spans if sp[1] > sp[0]]


def _check_fact(f: Fact) -> markup.LookupCall | None:
    try:
        return markup.LookupCall(f.entity, f.relation, f.value)
    except markup.MarkupError:
        return None


def _mentions_in(text: str, needle: str, regions: list[tuple[int, int]], ratio: float) -> list[tuple[int, int]]:
    """Mentions of ``needle`` inside ``regions``, in the first tier (exact, case-insensitive, fuzzy) with any."""
    for tier in ("exact", "ignore_case", "fuzzy"):
        found = []
        for lo, hi in regions:
            if tier == "fuzzy":
                found += fuzzy_mentions(text, needle, lo, hi, ratio)
            else:
                found += exact_mentions(text, needle, lo, hi, ignore_case=tier == "ignore_case")
        if found:
            return sorted(set(found))
    return []


def _outermost(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans not strictly inside another span of the list."""
    return [c for c in spans if not any(s <= c[0] and c[1] <= e and (s, e) != c for s, e in spans)]


def place_facts(text: str, facts: list[Fact], aliases: dict[str, str] | None = None, *,
                ratio: float = FUZZY_RATIO, scope: str = "document",
                subject: str | None = None) -> tuple[markup.Annotated, list[tuple[Fact, str]]]:
    """One call per fact, inserted right before a mention of its value that follows the entity's first
    mention (its name or an alias; ``aliases`` maps alias -> canonical entity). The text is never altered.

    ``scope="document"``: any later mention may be used. ``scope="sentence"`` (distant supervision):
    the ``subject`` (default: the entity introduced first) may use any later mention; every other
    entity only a mention later in a sentence that names it. When several entities have the same
    value, a mention goes to the one named nearest before it (in sentence scope: within the sentence,
    else the subject; an entity that is itself a value of the subject's facts does not count). A name
    inside a longer name ("Paris" in "University of Paris") or inside another fact's value mention is
    not a mention. A fact prefers a mention no other fact has taken; in sentence scope an entity
    states one fact per mention.

    Facts that cannot be placed come back, in input order, with a reason: "malformed", "duplicate",
    "entity_not_introduced", "mention_not_found", "mention_before_entity" (only before the entity
    is introduced), "mention_outside_entity_sentence" (sentence scope),
    "mention_attributed_to_other_entity", "mention_taken" (sentence scope).
    """
    if scope not in ("document", "sentence"):
        raise ValueError(f"place_facts scope must be 'document' or 'sentence', not {scope!r}")
    aliases_of = reverse_aliases(aliases)
    unplaced: list[tuple[Fact, str]] = []
    valid: list[tuple[Fact, markup.LookupCall]] = []
    seen: set[tuple[str, str, str]] = set()
    for f in facts:
        call = _check_fact(f)
        if call is None:
            unplaced.append((f, "malformed"))
        elif (f.entity, f.relation, f.value) in seen:
            unplaced.append((f, "duplicate"))
        else:
            seen.add((f.entity, f.relation, f.value))
            valid.append((f, call))

    raw_spans = {e: entity_mentions(text, surface_forms(e, aliases_of)) for e in dict.fromkeys(f.entity for f, _ in valid)}
    outer = set(_outermost(sorted({sp for spans in raw_spans.values() for sp in spans})))
    entity_spans = {e: [sp for sp in spans if sp in outer] for e, spans in raw_spans.items()}
    ordered_mentions = sorted((s, e, ent) for ent, spans in entity_spans.items() for s, e in spans)
    introduced = {e: spans[0] for e, spans in entity_spans.items() if spans}
    if scope == "sentence" and subject is None and introduced:
        subject = min(introduced, key=lambda e: (introduced[e][0], -(introduced[e][1] - introduced[e][0])))
    sentences = sentence_spans(text) if scope == "sentence" else [(0, len(text))]
    sentence_starts = [s for s, _ in sentences]

    def sentence_of(pos: int) -> tuple[int, int]:
        return sentences[max(0, bisect_right(sentence_starts, pos) - 1)]

    # pass 1: each fact's mentions in the part of the text where its entity is in context
    candidates: dict[int, list[tuple[int, int]]] = {}
    for i, (f, _) in enumerate(valid):
        spans = entity_spans[f.entity]
        if not spans:
            unplaced.append((f, "entity_not_introduced"))
            continue
        needle, intro_end = f.mention or f.value, spans[0][1]
        if scope == "document" or f.entity == subject:
            regions = [(intro_end, len(text))]
        else:
            regions = sorted({(e, sentence_of(s)[1]) for s, e in spans if e < sentence_of(s)[1]})
        found = [c for c in _mentions_in(text, needle, regions, ratio)
                 if not any(s <= c[0] and c[1] <= e and (s, e) != c for s, e, _ in ordered_mentions)]
        if found:
            candidates[i] = found
        elif regions == [(intro_end, len(text))]:
            before = _mentions_in(text, needle, [(0, intro_end)], ratio)
            unplaced.append((f, "mention_before_entity" if before else "mention_not_found"))
        else:
            elsewhere = exact_mentions(text, needle, ignore_case=True)
            unplaced.append((f, "mention_outside_entity_sentence" if elsewhere else "mention_not_found"))
    # "medicine" inside "Prize in Medicine" is part of another value's mention
    outer = set(_outermost(sorted({c for found in candidates.values() for c in found})))

    # entities that claim each value (casefolded): only they compete for its mentions
    claimants: dict[str, set[str]] = {}
    for f, _ in valid:
        claimants.setdefault((f.mention or f.value).casefold(), set()).add(f.entity)
    # entities that are values of the subject's facts ("joined Acme, based in Leeton") are attributes of
    # the subject in its sentences: they do not take the subject's values away from it
    subject_values = {f.value for f, _ in valid if f.entity == subject} if scope == "sentence" else set()

    def owner(pos: int, competitors: set[str]) -> str | None:
        """The competitor named nearest before ``pos`` (within its sentence in sentence scope)."""
        lo = sentence_of(pos)[0] if scope == "sentence" else 0
        best = None
        for s, e, ent in ordered_mentions:
            if s >= pos:
                break
            if s >= lo and e <= pos and ent in competitors and ent not in subject_values:
                best = ent
        if best is None and scope == "sentence" and subject in competitors and introduced[subject][1] <= pos:
            best = subject
        return best

    # pass 2: choose one mention per fact
    placed: list[markup.PlacedCall] = []
    taken: set[tuple[tuple[int, int], str]] = set()  # (mention span, entity) already used
    for i, found in candidates.items():
        f, call = valid[i]
        found = [c for c in found if c in outer]
        if not found:
            unplaced.append((f, "mention_not_found"))
            continue
        competitors = claimants[(f.mention or f.value).casefold()]
        if len(competitors) > 1:
            found = [c for c in found if owner(c[0], competitors) == f.entity]
            if not found:
                unplaced.append((f, "mention_attributed_to_other_entity"))
                continue
        free = [c for c in found if (c, f.entity) not in taken]
        if not free and scope == "sentence":  # one mention states one of an entity's facts
            unplaced.append((f, "mention_taken"))
            continue
        span = next((c for c in found if all((c, e) not in taken for e in competitors)), (free or found)[0])
        taken.add((span, f.entity))
        placed.append(markup.PlacedCall(call_offset(text, span[0]), call))
    placed.sort(key=lambda pc: pc.offset)
    position = {id(f): i for i, f in reversed(list(enumerate(facts)))}
    unplaced.sort(key=lambda u: position[id(u[0])])  # in the order the facts were given
    return markup.Annotated(text, tuple(placed)), unplaced
