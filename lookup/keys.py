"""Lookup keys: the normalised form of an entity or relation name, and when two names are one."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence


def normalize_key(text: str) -> str:
    """The exact-match form of a name: NFKC, casefolded, whitespace collapsed, punctuation stripped at the ends."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]).startswith("P")):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[start:end]


def name_words(normalized: str) -> tuple[str, ...]:
    """The words of a normalised name, each without punctuation at its ends ("j." -> "j")."""
    return tuple(w for w in (normalize_key(w) for w in normalized.split()) if w)


def is_name_variant(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two names (as words) are the same name with a middle part dropped or added.

    Same first word, same last word, and the shorter's words appear in order in the longer's:
    "john smith" ~ "john michael smith", but not "andrea jones" ~ "john andrea jones".
    """
    if len(a) < 2 or len(b) < 2 or a[0] != b[0] or a[-1] != b[-1]:
        return False
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    rest = iter(long)
    return all(w in rest for w in short)
