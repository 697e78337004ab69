"""The lookup markup grammar: parse, render, strip, escape, and the legacy ``dblookup`` form.

Canonical inline form (the reference's special tokens)::

    <|db_entity|> Napoleon<|db_relationship|> birthplace<|db_return|> Ajaccio<|db_end|> Ajaccio

A call is a pure insertion into the source text: removing every call gives the source back
exactly. The single space after each of the first three special tokens belongs to the markup,
not to the field. Calls are inserted just before the whitespace that precedes the value's
mention (so the mention keeps its leading space, as byte-level BPE tokenizers expect).

Legacy form (the reference's annotators)::

    [dblookup('Napoleon', 'birthplace') -> Ajaccio] Ajaccio

Escaping: a corpus document that literally contains ``<|db_`` or ``[dblookup(`` is escaped at
ingestion by inserting a WORD JOINER (U+2060) after the opening bracket; any run of joiners
already there gains one more, so ``unescape(escape(t)) == t`` for every ``t`` and an escaped
text never contains a call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DB_ENTITY = "<|db_entity|>"
DB_RELATIONSHIP = "<|db_relationship|>"
DB_RETURN = "<|db_return|>"
DB_END = "<|db_end|>"
SPECIAL_TOKENS = (DB_ENTITY, DB_RELATIONSHIP, DB_RETURN, DB_END)

ESCAPE_CHAR = "\u2060"
_ESCAPE_RE = re.compile(r"(<)(\u2060*)(\|db_)|(\[)(\u2060*)(dblookup\()")
_UNESCAPE_RE = re.compile(r"(<)\u2060(\u2060*)(\|db_)|(\[)\u2060(\u2060*)(dblookup\()")

_CALL_RE = re.compile(
    re.escape(DB_ENTITY) + r" ?(?P<entity>.*?)" + re.escape(DB_RELATIONSHIP) + r" ?(?P<relation>.*?)"
    + re.escape(DB_RETURN) + r" ?(?P<value>.*?)" + re.escape(DB_END),
    re.DOTALL,
)
_LEGACY_RE = re.compile(
    r"\[dblookup\(\s*(?P<q1>['\"])(?P<entity>.*?)(?P=q1)\s*,\s*(?P<q2>['\"])(?P<relation>.*?)(?P=q2)\s*\)"
    r"\s*->\s*(?P<value>.*?)\](?P<space> ?)",
    re.DOTALL,
)
_ANY_MARKER_RE = re.compile(
    "|".join(re.escape(t) for t in SPECIAL_TOKENS) + r"|\[dblookup\("
)


class MarkupError(ValueError):
    """Annotated text that does not follow the lookup grammar."""


@dataclass(frozen=True, order=True)
class LookupCall:
    """One database lookup: the key (entity, relation) and the value the database returns."""

    entity: str
    relation: str
    value: str

    def __post_init__(self) -> None:
        for name in ("entity", "relation", "value"):
            v = getattr(self, name)
            if not v or v != v.strip():
                raise MarkupError(f"lookup {name} must be non-empty with no surrounding whitespace: {v!r}")
            if _ANY_MARKER_RE.search(v):
                raise MarkupError(f"lookup {name} contains markup: {v!r}")

    @property
    def key(self) -> str:
        return f"{self.entity} {self.relation}"


@dataclass(frozen=True)
class PlacedCall:
    """A call inserted at character ``offset`` of the source text."""

    offset: int
    call: LookupCall


@dataclass(frozen=True)
class Annotated:
    """A source text and the calls inserted into it, sorted by offset (stable for equal offsets)."""

    text: str
    calls: tuple[PlacedCall, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        last = 0
        for pc in self.calls:
            if pc.offset < last or pc.offset > len(self.text):
                raise MarkupError(f"call offsets must be sorted and inside the text: {pc.offset}")
            last = pc.offset


def render_call(call: LookupCall) -> str:
    return f"{DB_ENTITY} {call.entity}{DB_RELATIONSHIP} {call.relation}{DB_RETURN} {call.value}{DB_END}"


def render_legacy_call(call: LookupCall) -> str:
    return f"[dblookup('{call.entity}', '{call.relation}') -> {call.value}] "


def render(ann: Annotated, legacy: bool = False) -> str:
    """Annotated text in the canonical special-token form (or the legacy ``dblookup`` form).

    The legacy form puts its call after the space before the mention ("in [dblookup(..)] Ajaccio")
    where the canonical form puts it before ("in<|db_entity|> ..<|db_end|> Ajaccio").
    """
    out, last = [], 0
    for pc in ann.calls:
        offset = pc.offset
        if legacy and ann.text[offset:offset + 1] == " ":
            offset += 1
        out.append(ann.text[last:offset])
        out.append(render_legacy_call(pc.call) if legacy else render_call(pc.call))
        last = offset
    out.append(ann.text[last:])
    return "".join(out)


def _parse_with(regex: re.Pattern, annotated: str, strict: bool) -> tuple[Annotated, list[str]]:
    pieces: list[str] = []
    calls: list[PlacedCall] = []
    errors: list[str] = []
    pos = 0
    length = 0
    for m in regex.finditer(annotated):
        pieces.append(annotated[pos:m.start()])
        length += m.start() - pos
        pos = m.end()
        try:
            call = LookupCall(m["entity"].strip(), m["relation"].strip(), m["value"].strip())
        except MarkupError as exc:
            if strict:
                raise
            errors.append(str(exc))
            continue
        calls.append(PlacedCall(length, call))
    pieces.append(annotated[pos:])
    text = "".join(pieces)
    stray = _ANY_MARKER_RE.search(text)
    if stray:
        msg = f"malformed call near character {stray.start()}: {text[stray.start():stray.start() + 60]!r}"
        if strict:
            raise MarkupError(msg)
        errors.append(msg)
    return Annotated(text, tuple(calls)), errors


def parse(annotated: str, strict: bool = True) -> Annotated:
    """Parse canonical markup. ``strict=False`` drops malformed calls instead of raising."""
    return _parse_with(_CALL_RE, annotated, strict)[0]


def parse_lenient(annotated: str, legacy: bool = False) -> tuple[Annotated, list[str]]:
    """Parse, dropping malformed calls; returns the result and one message per dropped call."""
    if legacy:
        ann, errors = _parse_with(_LEGACY_RE, annotated, strict=False)
        return _legacy_offsets(ann), errors
    return _parse_with(_CALL_RE, annotated, strict=False)


def parse_legacy(annotated: str, strict: bool = True) -> Annotated:
    """Parse the reference's ``[dblookup('E', 'R') -> V] `` form (the call owns one trailing space).

    Offsets are moved before the space that precedes the mention, as in the canonical form.
    """
    return _legacy_offsets(_parse_with(_LEGACY_RE, annotated, strict)[0])


def _legacy_offsets(ann: Annotated) -> Annotated:
    calls = tuple(
        PlacedCall(pc.offset - 1, pc.call) if pc.offset > 0 and ann.text[pc.offset - 1] == " " else pc
        for pc in ann.calls
    )
    return Annotated(ann.text, calls)


def strip(annotated: str) -> str:
    """The source text: every canonical call removed."""
    return _CALL_RE.sub("", annotated)


def legacy_to_canonical(annotated: str, strict: bool = True) -> str:
    return render(parse_legacy(annotated, strict=strict))


def canonical_to_legacy(annotated: str, strict: bool = True) -> str:
    return render(parse(annotated, strict=strict), legacy=True)


def escape(text: str) -> str:
    """Make literal markup in a source text inert (reversible, see module docstring)."""
    return _ESCAPE_RE.sub(lambda m: (m[1] + m[2] + ESCAPE_CHAR + m[3]) if m[1] else (m[4] + m[5] + ESCAPE_CHAR + m[6]), text)


def unescape(text: str) -> str:
    """Inverse of :func:`escape`; apply to source text on output."""
    return _UNESCAPE_RE.sub(lambda m: (m[1] + m[2] + m[3]) if m[1] else (m[4] + m[5] + m[6]), text)


def needs_escape(text: str) -> bool:
    return _ESCAPE_RE.search(text) is not None


def calls_per_100_words(annotated: Annotated) -> float:
    words = len(annotated.text.split())
    return 100.0 * len(annotated.calls) / max(words, 1)


def mention_span(text: str, offset: int, value: str) -> tuple[int, int] | None:
    """Span of the value's mention right after a call at ``offset`` (leading whitespace skipped)."""
    start = offset
    while start < len(text) and text[start].isspace():
        start += 1
    if text.startswith(value, start):
        return start, start + len(value)
    return None
