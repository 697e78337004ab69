"""Annotating with the encoder annotator (``models/span_annotator.py``): documents read in length-sorted batches of
windows under ``torch.inference_mode``, value spans from the most likely valid BIO sequence (snapped to whole
words), one entity span per value from the pointer, relation names decoded greedily; calls placed before their
value's mention, so the output strips back to the source by construction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from models.span_annotator import TAG_B, TAG_I, TAG_O, RelationNames, SpanAnnotator, detokenize
from models.span_examples import Encoded, Window, call_offset, encode_texts, is_word_char, snap_to_words, windows_of
from schemas import markup
from schemas.configs import BulkAnnotationConfig

# ----------------------------------------------------------------------------- annotating


_BULK = BulkAnnotationConfig.model_fields  # the decode settings' defaults and meanings are the bulk config's, once
# bumped when the decoder writes other calls from the same model and settings (2: values end on a whole word), so that
# shards annotated before are annotated again: it is part of the annotator version a shard is recorded under
DECODER_REVISION = 2


def _subject_margin(entity: str) -> float | None:
    """bulk.entity as the decoder's margin: title -> the title whenever there is one; pointer -> the pointer alone."""
    return float("inf") if entity == "title" else None


@dataclass
class AnnotateOptions:
    """How documents are decoded. The settings a user picks in ``bulk:`` (BulkAnnotationConfig, where each is
    described and measured) default to that config's values; :meth:`from_config` maps a config onto them."""

    batch_tokens: int = _BULK["batch_tokens"].default  # padded tokens per encoder batch (windows are length-sorted)
    bf16: bool | None = None  # bfloat16 weights; None: on CUDA and on CPUs with native bf16
    value_bias: float = 0.0  # added to the log-probability of a value starting (B): > 0 finds more values
    continue_bias: float = _BULK["continue_bias"].default  # added to the log-probability of a value going on (I)
    # the entity is the document's title line unless the pointer prefers another span by more than this (log-prob.);
    # None: the pointer alone (bulk.entity pointer); inf: the title whenever there is one (bulk.entity title)
    subject_margin: float | None = _subject_margin(_BULK["entity"].default)
    relation: Literal["seed", "generate"] = _BULK["relation"].default  # the name scorer's seed names or the decoder's

    @classmethod
    def from_config(cls, cfg: BulkAnnotationConfig) -> "AnnotateOptions":
        return cls(batch_tokens=cfg.batch_tokens, continue_bias=cfg.continue_bias,
                   subject_margin=_subject_margin(cfg.entity), relation=cfg.relation)


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


def heading(text: str, longest: int = 100) -> tuple[int, int] | None:
    """Characters of the document's title when it opens with one: a first line of at most ``longest`` characters,
    not ending like a sentence or clause, followed by a blank line (how Wikipedia dumps, the LMLM corpus, write a
    page's title), else None. A short opening paragraph ends with its punctuation, so it is not taken for a title."""
    end = text.find("\n\n", 0, longest + 2)
    if end <= 0 or "\n" in text[:end]:
        return None
    start, end = snap_to_words(text, 0, end)
    return (start, end) if end > start and text[end - 1] not in ".!?;:," else None


def whole_heading(title: tuple[int, int] | None, start: int, end: int) -> tuple[int, int]:
    """An entity span inside the document's title (:func:`heading`) widened to the whole title: a page's subject is its
    title, and the pointer, which scores a span's two ends apart, often stops inside it ("European Athletics
    Championships" of "Ireland at the 2014 European Athletics Championships")."""
    return title if title and title[0] <= start and end <= title[1] else (start, end)


def bio_viterbi(logp: torch.Tensor, lines: torch.Tensor, taggable: torch.Tensor,
                endable: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) the most likely O/B/I sequence of each window under BIO's rule: an I continues a B or an I on the same
    line. ``logp`` (B, T, 3) tag log-probabilities, ``lines`` (B, T) line ids, ``taggable`` (B, T) positions that
    may hold a value (the window's body; specials, the repeated head and padding are O), ``endable`` (B, T)
    positions a value may end at (default: all; :func:`endable_positions`). Per-token argmax instead cuts values in
    two ("New" | "Connecticut" for "New Haven, Connecticut") and starts values at a stray I."""
    B, T, _ = logp.shape
    neg = torch.tensor(-1e9, dtype=logp.dtype)
    lp = torch.where(taggable[..., None], logp, torch.tensor([0.0, -1e9, -1e9], dtype=logp.dtype))
    score = lp[:, 0].clone()
    score[:, TAG_I] = neg  # nothing before the first position to continue
    back = torch.zeros((B, T, 3), dtype=torch.long)
    is_o = torch.arange(3) == TAG_O
    for t in range(1, T):
        ended = score if endable is None else torch.where(endable[:, t - 1, None] | is_o, score, neg)
        best, arg = ended.max(-1)  # O and B follow an O or the end of a value
        i_from = torch.where(score[:, TAG_B] >= score[:, TAG_I], TAG_B, TAG_I)
        cont = torch.where(lines[:, t] == lines[:, t - 1], torch.maximum(score[:, TAG_B], score[:, TAG_I]), neg)
        new = torch.empty_like(score)
        new[:, TAG_O], new[:, TAG_B], new[:, TAG_I] = best + lp[:, t, TAG_O], best + lp[:, t, TAG_B], cont + lp[:, t, TAG_I]
        back[:, t, TAG_O], back[:, t, TAG_B], back[:, t, TAG_I] = arg, arg, i_from
        score = new
    labels = torch.zeros((B, T), dtype=torch.long)
    state = score.argmax(-1)
    for t in range(T - 1, -1, -1):
        labels[:, t] = state
        state = back[:, t].gather(1, state[:, None]).squeeze(1)
    return labels


_DANGLING = (frozenset(",;:(/&-–—")
             | frozenset("a an and as at by for from in into of on or than the to with".split()))


def endable_positions(w: Window, enc: Encoded, text: str) -> list[bool]:
    """Per window position, whether a value may end there: not on a word a value cannot end with (a comma, an
    opening bracket, a hyphen or dash, a preposition, article or conjunction: "May 11," of "May 11, 1751", "Bank
    of" of "Bank of Celina") and not inside a hyphenated word ("four" of "four-year")."""
    out = []
    for p in w.pos:
        if p < 0:
            out.append(True)
            continue
        a, b = enc.offsets[p]
        piece = text[a:b].lower()
        whole = not is_word_char(piece[:1]) or ((a == 0 or not is_word_char(text[a - 1]))
                                                and (b == len(text) or not is_word_char(text[b])))
        joined = b + 1 < len(text) and text[b] in "-–" and is_word_char(text[b - 1]) and is_word_char(text[b + 1])
        out.append(not joined and not (whole and piece in _DANGLING))
    return out


def _value_spans(labels: list[int], w: Window) -> list[tuple[int, int]]:
    """[first, last] window positions of the value spans (B I*) of a window's BIO labels that start in its core."""
    spans, k, n = [], w.body, len(w.ids) - 1
    while k < n:
        if labels[k] != TAG_B:
            k += 1
            continue
        j = k
        while j + 1 < n and labels[j + 1] == TAG_I:
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
    sep = model.sep_id
    kvs, mask_c, h_c, ids_c = model.call_memory(h, mask, ids, win)  # once, not per decoding step
    for step in range(model.cfg.max_relation_tokens + 1):
        states = model.decode_relation(kvs, mask_c, bos, out)[:, -1:]
        vocab, copy, log_g, log_ng = model.relation_scores(states, h_c, ids_c)
        p = torch.zeros((C, V), device=h.device)
        p.index_add_(1, model.relation_vocab, (vocab[:, 0] + log_g[:, 0]).exp())
        p.scatter_add_(1, ids_c, (copy[:, 0] + log_ng[:, 0]).exp())
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
    return first, first + length, best


def _title_tokens(enc: Encoded, title: tuple[int, int] | None) -> tuple[int, int] | None:
    """[first, last] document tokens of the title (:func:`heading`, which opens the document), or None."""
    if title is None:
        return None
    inside = []
    for k, (a, b) in enumerate(enc.offsets):
        if b > title[1]:
            break
        if a >= title[0] and b > a:
            inside.append(k)
    return (inside[0], inside[-1]) if inside else None


def _prefer_subject(start, end, e_first, e_last, e_score, wins: list[Window], titles: list, margin: float):
    """Each call's entity becomes its document's title (when the document opens with one the window shows) unless
    the pointer's best span outscores the title span by more than ``margin`` (log-probability): a page's facts are
    mostly about its subject, and the pointer, trained on another domain's share of subject calls, strays from it
    too readily (``AnnotateOptions.subject_margin``)."""
    at = [(w.position(t[0]), w.position(t[1])) if t is not None else (-1, -1) for w, t in zip(wins, titles)]
    a, b = (torch.tensor(x, device=start.device) for x in zip(*at))
    rows = torch.arange(len(at), device=start.device)
    shown = (a >= 0) & (b >= 0)
    title = start[rows, a.clamp(min=0)] + end[rows, b.clamp(min=0)]
    use = shown & (title + margin >= e_score)
    return torch.where(use, a, e_first), torch.where(use, b, e_last)


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
    titles = [heading(t) for t in texts]  # once per document, not per call
    title_tokens = [_title_tokens(e, t) for e, t in zip(encs, titles)]
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
        logp[..., TAG_I] += opts.continue_bias
        lines = [line_ids(w, encs[w.doc], texts[w.doc]) + [-1] * (T - len(w.ids)) for w in batch]
        taggable = torch.tensor([[w.body <= k < len(w.ids) - 1 and w.pos[k] >= 0 for k in range(T)] for w in batch])
        endable = torch.tensor([endable_positions(w, encs[w.doc], texts[w.doc]) + [True] * (T - len(w.ids))
                                for w in batch])
        labels = bio_viterbi(logp, torch.tensor(lines), taggable, endable).tolist()
        spans = [(r, a, b) for r, w in enumerate(batch) for a, b in _value_spans(labels[r], w)]
        if not spans:
            continue
        win = torch.tensor([s[0] for s in spans], device=device)
        first = torch.tensor([s[1] for s in spans], device=device)
        last = torch.tensor([s[2] for s in spans], device=device)
        parts = model.value_parts(h, win, first, last)  # gathered once: the value query and the name scorer read it
        q = model.value_query(parts[2])
        start, end = model.entity_logits(h, ids, win, q)
        e_first, e_last, e_score = _best_entities(start, end, torch.tensor(lines, device=device)[win],
                                                  model.cfg.max_entity_tokens)
        if opts.subject_margin is not None:
            e_first, e_last = _prefer_subject(start, end, e_first, e_last, e_score, [batch[s[0]] for s in spans],
                                              [title_tokens[batch[s[0]].doc] for s in spans], opts.subject_margin)
        ents = list(zip(e_first.tolist(), e_last.tolist()))
        if opts.relation == "seed" and model.name_table.shape[0]:
            best = model.name_logits(model.name_features(h, ids, win, first, last, e_first, e_last,
                                                         parts=parts)).argmax(-1)
            relations = [names.names[names.candidates[k]] for k in best.tolist()]
        else:
            pieces = _greedy_relations(model, h, mask, ids, win, q + model.entity_vectors(h, win, e_first, e_last))
            relations = [names.spell(detokenize(tokenizer, p), texts[batch[r].doc]) if p else ""
                         for (r, _, _), p in zip(spans, pieces)]
        for (r, a, b), (ea, eb), relation in zip(spans, ents, relations):
            w = batch[r]
            enc, text = encs[w.doc], texts[w.doc]
            vs, ve = snap_to_words(text, enc.offsets[w.pos[a]][0], enc.offsets[w.pos[b]][1])
            es, ee = whole_heading(titles[w.doc], *snap_to_words(text, enc.offsets[w.pos[ea]][0], enc.offsets[w.pos[eb]][1])) \
                if w.pos[ea] >= 0 and w.pos[eb] >= 0 else (0, 0)
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
