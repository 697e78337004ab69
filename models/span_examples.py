"""Training examples of the encoder annotator (``models/span_annotator.py``): documents as word pieces with their
character offsets, the overlapping windows a long document is read in, and each call's targets (value span,
entity mentions, relation name) in window positions. The decoder reads documents through the same windows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from models.span_annotator import IGNORE, TAG_B, TAG_I, TAG_O, SpanAnnotatorConfig
from schemas import markup

# ----------------------------------------------------------------------------- text -> words, windows


def is_word_char(c: str) -> bool:
    return c.isalnum()


def snap_to_words(text: str, start: int, end: int) -> tuple[int, int]:
    """Widen [start, end) so it cuts no run of letters and digits in two, then trim surrounding whitespace."""
    while start > 0 and start < len(text) and is_word_char(text[start - 1]) and is_word_char(text[start]):
        start -= 1
    while 0 < end < len(text) and is_word_char(text[end - 1]) and is_word_char(text[end]):
        end += 1
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def call_offset(text: str, mention_start: int) -> int:
    """Where a call goes: before the whitespace that precedes its value's mention (``schemas.markup``)."""
    while mention_start > 0 and text[mention_start - 1].isspace():
        mention_start -= 1
    return mention_start


@dataclass
class Encoded:
    ids: list[int]  # word pieces of the text, no special tokens
    offsets: list[tuple[int, int]]  # their character spans in the text


def encode_texts(tokenizer, texts: list[str]) -> list[Encoded]:
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)
    return [Encoded(ids, [tuple(o) for o in offs]) for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]


@dataclass
class Window:
    doc: int  # index of the document in its batch
    ids: list[int]  # [CLS] body [SEP]  or  [CLS] head [SEP] body [SEP]
    pos: list[int]  # per position: the document token there, -1 for a special token
    body: int  # position of the first body token
    start: int  # document token at ``body``
    core: tuple[int, int]  # document tokens whose value spans this window keeps

    def position(self, token: int, head_ok: bool = True) -> int:
        """The window position of document token ``token``, or -1 when the window does not show it."""
        if self.start <= token < self.start + len(self.ids) - self.body - 1:
            return self.body + token - self.start
        if head_ok and self.body > 1 and token < self.body - 2:
            return 1 + token
        return -1


def windows_of(doc: int, ids: list[int], cfg: SpanAnnotatorConfig, cls: int, sep: int) -> list[Window]:
    """Overlapping windows covering a document's word pieces (see module docstring)."""
    n, room = len(ids), cfg.window - 2
    if n <= room:
        return [Window(doc, [cls, *ids, sep], [-1, *range(n), -1], 1, 0, (0, n))]
    head = min(cfg.head_tokens, room // 4)
    length = cfg.window - 3 - head  # body tokens of a later window
    chunks = [(0, room)]
    while chunks[-1][1] < n:
        s = chunks[-1][1] - cfg.overlap
        chunks.append((max(min(s, n - length), chunks[-1][0] + 1), min(s + length, n)))
    cuts = [0] + [(chunks[k][0] + chunks[k - 1][1]) // 2 for k in range(1, len(chunks))] + [n]
    out = []
    for k, (s, e) in enumerate(chunks):
        if k == 0:
            out.append(Window(doc, [cls, *ids[s:e], sep], [-1, *range(s, e), -1], 1, s, (cuts[0], cuts[1])))
        else:
            out.append(Window(doc, [cls, *ids[:head], sep, *ids[s:e], sep],
                              [-1, *range(head), -1, *range(s, e), -1], head + 2, s, (cuts[k], cuts[k + 1])))
    return out


# ----------------------------------------------------------------------------- training targets


@dataclass
class CallTarget:
    value: tuple[int, int]  # document tokens [first, last] of the value's mention
    entity: list[tuple[int, int]]  # document token spans where the entity is mentioned (may be empty)
    relation: str


def _token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """[first, last] tokens overlapping characters [start, end)."""
    toks = [k for k, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
    return (toks[0], toks[-1]) if toks else None


def locate_value(text: str, value: str, offset: int, reach: int = 300) -> tuple[int, int] | None:
    """Characters of the value's mention for a call at ``offset``: the first match (ignoring case) at or after
    the call within ``reach`` characters, else the nearest one before it; snapped to whole words."""
    low, v = text.lower(), value.lower()
    at = low.find(v, offset)
    if at == -1 or at - offset > reach:
        at = low.rfind(v, 0, offset)
        if at == -1 or offset - at > reach:
            return None
    s, e = snap_to_words(text, at, at + len(v))
    return (s, e) if e - s <= len(v) + 8 else None


def locate_entity(text: str, entity: str) -> list[tuple[int, int]]:
    """Every whole-word mention of the entity (ignoring case), in order."""
    pat = re.compile(r"(?<!\w)" + re.escape(entity) + r"(?!\w)", re.IGNORECASE)
    return [(m.start(), m.end()) for m in pat.finditer(text)]


def call_targets(ann: markup.Annotated, enc: Encoded) -> list[CallTarget]:
    """The calls of an annotated document as token spans; calls whose value is not in the text are left out
    (an extractive model cannot write them)."""
    out = []
    for pc in ann.calls:
        c = pc.call
        chars = locate_value(ann.text, c.value, pc.offset)
        span = _token_span(enc.offsets, *chars) if chars else None
        if span is None:
            continue
        ents = [t for t in (_token_span(enc.offsets, a, b) for a, b in locate_entity(ann.text, c.entity)) if t]
        out.append(CallTarget(span, ents, c.relation))
    return out


@dataclass
class Example:
    """One window with its targets, in window positions."""

    ids: list[int]
    tags: list[int]  # TAG_* per position, IGNORE on special tokens and the repeated head
    calls: list[tuple[int, int, int, int, list[int]]]  # (value first, value last, entity first, entity last, relation ids)
    lower: torch.Tensor | None = None  # (T, d) hidden states after the frozen layers, computed once (see cache_lower)


def build_examples(tokenizer, docs: list[markup.Annotated], cfg: SpanAnnotatorConfig) -> list[Example]:
    """Training windows of annotated documents."""
    encs = encode_texts(tokenizer, [d.text for d in docs])
    sep = tokenizer.sep_token_id
    out = []
    for d, (ann, enc) in enumerate(zip(docs, encs)):
        targets = call_targets(ann, enc)
        tags = [TAG_O] * len(enc.ids)
        taken = [False] * len(enc.ids)
        for t in sorted(targets, key=lambda t: (t.value[0], -t.value[1])):
            a, b = t.value
            if any(taken[a:b + 1]):
                continue  # BIO cannot nest spans: the earlier (longer) one wins
            tags[a], taken[a] = TAG_B, True
            for k in range(a + 1, b + 1):
                tags[k], taken[k] = TAG_I, True
        for w in windows_of(d, enc.ids, cfg, tokenizer.cls_token_id, sep):
            wtags = [IGNORE if (p < 0 or k < w.body) else tags[p] for k, p in enumerate(w.pos)]
            calls = []
            for t in targets:
                a, b = t.value
                if not (w.core[0] <= a < w.core[1]):
                    continue
                pa, pb = w.position(a, head_ok=False), w.position(b, head_ok=False)
                if pa < 0 or pb < 0:
                    continue
                ea = eb = IGNORE
                for s, e in t.entity:  # the first mention the window shows
                    if w.position(s) >= 0 and w.position(e) >= 0 and e - s < cfg.max_entity_tokens:
                        ea, eb = w.position(s), w.position(e)
                        break
                rel = tokenizer(t.relation, add_special_tokens=False)["input_ids"][:cfg.max_relation_tokens] + [sep]
                calls.append((pa, pb, ea, eb, rel))
            out.append(Example(w.ids, wtags, calls))
    return out
