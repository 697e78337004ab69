"""Decoding for the small annotator (:mod:`models.annotator`) that cannot alter the source.

Decoding is constrained so that the output, stripped of its calls, *is* the source: outside a call
the only tokens allowed are the next source token or ``<|db_entity|>`` (at a character boundary that
does not split a word);
inside a call decoding is free (special tokens only in grammar order) until ``<|db_end|>``; after a
call the rest of the source is re-tokenized, exactly as the training target tokenizes it. Because
the source is known, it is not decoded token by token: each forward pass feeds the next chunk of
source tokens as a draft and keeps the prefix the model agrees with (the first place where it
would open a call ends the chunk); inside a call, the value is drafted from the upcoming source text,
the entity from earlier text (prompt lookup) and the relation from the relations of the calls closed so
far in the run, all documents (a small vocabulary). Every draft is verified against the greedy
choice, so the result equals step-by-step constrained greedy decoding (``chunk_tokens=1,
draft_tokens=0``), up to floating-point ties. Documents are batched (length-sorted); per-row
rejected draft slots stay in the KV cache as masked holes, compacted away when they pile up.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass

import torch

from models.annotator import prompt_ids, segment_bounds
from models.kv_cache import cache_keyword, keep_positions, new_cache
from models.tokenizer import lookup_token_ids
from schemas import markup

SOURCE, ENTITY, RELATION, VALUE = range(4)


@dataclass
class DecodeStats:
    """What decoding cost: documents, source and call tokens produced, forward passes, tokens fed."""

    documents: int = 0
    source_tokens: int = 0
    call_tokens: int = 0
    forward_passes: int = 0
    fed_tokens: int = 0  # slots fed to the model (drafts included, padding excluded)
    calls_aborted: int = 0  # calls that did not close within max_call_tokens: rolled back
    calls_malformed: int = 0  # closed calls with an empty or invalid field, or repeating a call at its place: dropped
    seconds: float = 0.0


@dataclass
class DecodeOptions:
    chunk_tokens: int = 32  # source tokens fed per forward pass (1 = step by step)
    draft_tokens: int = 8  # drafted call tokens per forward pass (0 = none)
    batch_size: int = 16  # documents decoded together
    max_call_tokens: int = 48  # a call still open after this many tokens is rolled back
    max_calls_at_position: int = 3  # no further call at a character offset that already has this many
    # calls opened (kept or rolled back) per segment, per 100 words (rounded up): bounds what a poorly trained
    # model costs (the reference's density filter drops documents above 12 anyway); None: no cap
    max_calls_per_100_words: float | None = 20.0
    max_source_tokens: int = 384  # longer documents are annotated in segments


def splits_word(text: str, char: int) -> bool:
    """A call at ``char`` would sit inside a word (between two letters or digits): never where markup
    puts one (before the whitespace preceding a mention, or at the mention's start after punctuation)."""
    return 0 < char < len(text) and text[char - 1].isalnum() and text[char].isalnum()


class _Row:
    """One segment being annotated: where it stands in its source and in its call."""

    def __init__(self, index: int, text: str, tokenizer, max_calls_per_100_words: float | None = None):
        self.index, self.text = index, text
        self.calls_left = (len(text) + 1 if max_calls_per_100_words is None  # more than it could ever open
                           else math.ceil(max_calls_per_100_words * len(text.split()) / 100))
        self.state = SOURCE
        self.call: list[int] = []
        self.call_slots: list[int] = []  # cache slots of the open call (rolled back on abort)
        self.call_char = 0
        self.calls: list[tuple[int, list[int]]] = []  # (character offset, call tokens ENT..END)
        self.context: list[int] = []  # prompt + output, for prompt-lookup drafts
        self.blocked: int | None = None  # character offset where a call was rolled back
        self.logits_before_call: torch.Tensor | None = None
        self.n_valid = 0  # cache slots this row attends to (its next position id)
        self.retokenize(0, tokenizer)

    def retokenize(self, pos: int, tokenizer) -> None:
        """Source tokens of ``text[pos:]`` and the character offset of every token boundary (None inside
        a character split across tokens)."""
        enc = tokenizer(self.text[pos:], add_special_tokens=False, return_offsets_mapping=True)
        self.pos, self.src, self.i = pos, enc["input_ids"], 0
        offs = enc["offset_mapping"]
        self.char_at: list[int | None] = []
        for k in range(len(self.src)):
            ok = k == 0 or offs[k - 1][1] <= offs[k][0]
            self.char_at.append(pos + offs[k][0] if ok and not splits_word(self.text, pos + offs[k][0]) else None)

    @property
    def done(self) -> bool:
        return self.state == SOURCE and self.i >= len(self.src)

    def calls_at(self, char: int) -> int:
        return sum(1 for c, _ in self.calls if c == char)


class _Decoder:
    def __init__(self, model, tokenizer, opts: DecodeOptions):
        self.model, self.tok, self.opts = model, tokenizer, opts
        self.ids = lookup_token_ids(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        V = model.get_output_embeddings().weight.shape[0]
        ent, rel, ret, end, eos = self.ids.entity, self.ids.relationship, self.ids.ret, self.ids.end, self.eos
        forbid = torch.zeros((4, V), dtype=torch.bool)
        for state, banned in ((ENTITY, (ent, ret, end, eos)), (RELATION, (ent, rel, end, eos)),
                              (VALUE, (ent, rel, ret, eos))):
            forbid[state, list(banned)] = True
        self.forbid = forbid
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        self.cache_arg = cache_keyword(self.base)
        self.relations: Counter[tuple[int, ...]] = Counter()  # relation tokens + <|db_return|> of closed calls

    # -- grammar

    def choose(self, logits: torch.Tensor, row: _Row, state: int, i: int, call_len: int) -> int:
        """The greedy token for a row in ``state`` at source slot ``i`` (SOURCE) or call length ``call_len``."""
        if state == SOURCE:
            src = row.src[i]
            char = row.char_at[i]
            if (char is None or char == row.blocked or row.calls_left <= 0
                    or row.calls_at(char) >= self.opts.max_calls_at_position):
                return src
            return self.ids.entity if logits[self.ids.entity] > logits[src] else src
        return int(logits.masked_fill(self.forbid[state], float("-inf")).argmax())

    def advance(self, row: _Row, tok: int, slot: int) -> None:
        """Apply one accepted token to the row's state."""
        row.context.append(tok)
        if row.state == SOURCE:
            if tok == self.ids.entity:
                row.state, row.call, row.call_slots = ENTITY, [tok], [slot]
                row.calls_left -= 1
                row.call_char = row.char_at[row.i]
            else:
                row.i += 1
            return
        row.call.append(tok)
        row.call_slots.append(slot)
        if row.state == ENTITY and tok == self.ids.relationship:
            row.state = RELATION
        elif row.state == RELATION and tok == self.ids.ret:
            row.state = VALUE
        elif row.state == VALUE and tok == self.ids.end:
            row.calls.append((row.call_char, row.call))
            rel_start, ret_at = row.call.index(self.ids.relationship) + 1, row.call.index(self.ids.ret)
            self.relations[tuple(row.call[rel_start:ret_at + 1])] += 1
            row.state, row.call, row.call_slots, row.blocked = SOURCE, [], [], None
            row.retokenize(row.call_char, self.tok)

    def draft(self, row: _Row) -> list[int]:
        """Tokens likely to follow: the source itself, or (in a call) a continuation seen earlier, and
        after ``<|db_return|>`` the upcoming source as the value."""
        o = self.opts
        if row.state == SOURCE:
            return row.src[row.i:row.i + o.chunk_tokens - 1]
        if o.draft_tokens == 0:
            return []
        if row.state == VALUE:  # the value is the mention that follows the call
            return row.src[row.i:row.i + o.draft_tokens]
        out = ((self.recall_relation(row) if row.state == RELATION else []) or self.prompt_lookup(row))[:o.draft_tokens]
        if out and out[-1] == self.ids.ret:
            out += row.src[row.i:row.i + o.draft_tokens - len(out)]
        return out

    def prompt_lookup(self, row: _Row) -> list[int]:
        """What followed the latest earlier occurrence of the context's last 3, 2 or 1 tokens, up to
        ``<|db_return|>`` (the value comes from the source instead)."""
        ctx = row.context
        for n in (3, 2, 1):
            if len(ctx) <= n:
                continue
            key = ctx[-n:]
            for s in range(len(ctx) - n - 1, -1, -1):
                if ctx[s:s + n] == key:
                    out = []
                    for t in ctx[s + n:s + n + self.opts.draft_tokens]:
                        out.append(t)
                        if t == self.ids.ret:
                            break
                    if out:
                        return out
                    break
        return []

    def recall_relation(self, row: _Row) -> list[int]:
        """The rest of the most frequent relation (through ``<|db_return|>``) of the calls closed so far in
        this run, all documents, that starts with the relation tokens chosen so far: relation names come
        from a small vocabulary that one document rarely repeats but the corpus does."""
        prefix = tuple(row.call[row.call.index(self.ids.relationship) + 1:])
        best, count = None, 0
        for rel, n in self.relations.items():
            if n > count and len(rel) > len(prefix) and rel[:len(prefix)] == prefix:
                best, count = rel, n
        return list(best[len(prefix):]) if best else []

    # -- model

    def forward(self, ids, attn, positions, cache, keep: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.base(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True,
                           **{self.cache_arg: cache}).last_hidden_state
        if keep is not None:
            hidden = hidden[torch.arange(hidden.shape[0]), keep]
        return self.head(hidden).float()

    # -- the loop

    @torch.no_grad()
    def run(self, texts: list[str], stats: DecodeStats) -> list[_Row]:
        rows = [_Row(k, t, self.tok, self.opts.max_calls_per_100_words) for k, t in enumerate(texts)]
        prompts = [prompt_ids(self.tok, t) for t in texts]
        for r, p in zip(rows, prompts):
            r.context = list(p)
        B, P = len(rows), max(len(p) for p in prompts)
        ids = torch.full((B, P), self.eos, dtype=torch.long)
        valid = torch.zeros((B, P), dtype=torch.bool)
        for k, p in enumerate(prompts):  # right padding: pad slots attend to real tokens, never NaN
            ids[k, :len(p)], valid[k, :len(p)] = torch.tensor(p), True
            rows[k].n_valid = len(p)
        positions = torch.arange(P).expand(B, P)
        cache = new_cache(self.model.config, growing=True)
        lengths = torch.tensor([len(p) for p in prompts])
        last = self.forward(ids.to(self.device), valid.long().to(self.device), positions.to(self.device), cache,
                            keep=(lengths - 1).to(self.device)).cpu()
        stats.forward_passes += 1
        stats.fed_tokens += int(lengths.sum())
        active = [r for r in rows if not r.done]
        if len(active) < B:
            keep_idx = [k for k, r in enumerate(rows) if not r.done]
            cache.batch_select_indices(torch.tensor(keep_idx, device=self.device))
            valid, last = valid[keep_idx], last[keep_idx]

        while active:
            T = valid.shape[1]
            feeds: list[list[int]] = []
            for k, row in enumerate(active):
                if row.state != SOURCE and len(row.call) >= self.opts.max_call_tokens:
                    self.abort_call(row, valid, k)
                    last[k] = row.logits_before_call
                    stats.calls_aborted += 1
                    feeds.append([])
                    continue
                t0 = self.choose(last[k], row, row.state, row.i, len(row.call))
                if t0 == self.ids.entity and row.state == SOURCE:
                    row.logits_before_call = last[k].clone()
                self.advance(row, t0, T)
                feeds.append([t0] + ([] if row.done else self.draft(row)))
            W = max(len(f) for f in feeds)
            if W == 0:
                continue
            ids = torch.full((len(active), W), self.eos, dtype=torch.long)
            fmask = torch.zeros((len(active), W), dtype=torch.bool)
            for k, f in enumerate(feeds):
                ids[k, :len(f)] = torch.tensor(f, dtype=torch.long)
                fmask[k, :len(f)] = True
            positions = torch.tensor([r.n_valid for r in active]).unsqueeze(1) + torch.arange(W)
            valid = torch.cat([valid, fmask], dim=1)
            logits = self.forward(ids.to(self.device), valid.long().to(self.device), positions.to(self.device),
                                  cache).cpu()
            stats.forward_passes += 1
            stats.fed_tokens += int(fmask.sum())
            for k, (row, f) in enumerate(zip(active, feeds)):
                if not f:
                    continue
                accepted = 0
                for j in range(1, len(f)):  # verify the draft: keep what greedy decoding would produce
                    state, i = row.state, row.i
                    if state != SOURCE and len(row.call) >= self.opts.max_call_tokens:
                        break  # the call is at its limit: the next step rolls it back, as step by step would
                    if self.choose(logits[k, j - 1], row, state, i, len(row.call)) != f[j]:
                        break
                    self.advance(row, f[j], T + j)
                    accepted += 1
                valid[k, T + 1 + accepted:T + W] = False
                row.n_valid += 1 + accepted
                last[k] = logits[k, accepted]
            finished = [k for k, r in enumerate(active) if r.done]
            if finished:
                keep_idx = [k for k, r in enumerate(active) if not r.done]
                active = [active[k] for k in keep_idx]
                if not active:
                    break
                cache.batch_select_indices(torch.tensor(keep_idx, device=self.device))
                valid, last = valid[keep_idx], last[keep_idx]
            valid = self.compact(cache, valid, active)
        for r in rows:
            stats.source_tokens += len(prompts[r.index]) - 2
            stats.call_tokens += sum(len(c) for _, c in r.calls)
        return rows

    def abort_call(self, row: _Row, valid: torch.Tensor, k: int) -> None:
        """Roll back an open call as if it had never been started; no call at that offset again."""
        valid[k, row.call_slots] = False
        row.n_valid -= len(row.call_slots)
        del row.context[len(row.context) - len(row.call):]
        row.state, row.call, row.call_slots, row.blocked = SOURCE, [], [], row.call_char

    def compact(self, cache, valid: torch.Tensor, active: list[_Row]) -> torch.Tensor:
        """Drop masked holes from the cache once they are at least half of it (left-padded per row).

        Slots of an open call move too, so their recorded indices are remapped.
        """
        T = valid.shape[1]
        counts = valid.sum(dim=1)
        width = int(counts.max())
        if T < 64 or width * 2 > T:
            return valid
        index = torch.zeros((len(active), width), dtype=torch.long)
        new_valid = torch.zeros((len(active), width), dtype=torch.bool)
        for k, row in enumerate(active):
            slots = valid[k].nonzero().squeeze(1)
            n = len(slots)
            index[k, width - n:] = slots
            new_valid[k, width - n:] = True
            if row.call_slots:
                remap = {int(s): width - n + j for j, s in enumerate(slots)}
                row.call_slots = [remap[s] for s in row.call_slots]
        keep_positions(cache, index.to(self.device))
        return new_valid


@dataclass
class DecodedDocument:
    annotated: markup.Annotated  # calls on the exact source text
    malformed: int = 0  # calls dropped because a field was empty or invalid, or repeated at the same place


def decode_call(tokenizer, ids: list[int]) -> markup.LookupCall:
    """The LookupCall of call tokens ``ENT e.. REL r.. RET v.. END``; MarkupError when a field is bad."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    parsed = markup.parse(text)
    if len(parsed.calls) != 1 or parsed.text:
        raise markup.MarkupError(f"not one call: {text!r}")
    return parsed.calls[0].call


def annotate_texts(model, tokenizer, texts: list[str], opts: DecodeOptions | None = None,
                   stats: DecodeStats | None = None) -> list[DecodedDocument]:
    """Annotate source texts with constrained, chunked, batched greedy decoding (see module docstring).

    ``strip(render(result.annotated)) == text`` for every text, by construction.
    """
    opts = opts or DecodeOptions()
    stats = stats if stats is not None else DecodeStats()
    t0 = time.perf_counter()
    decoder = _Decoder(model, tokenizer, opts)
    segments: list[tuple[int, int, str]] = []  # (doc index, offset, text)
    for d, text in enumerate(texts):
        for a, b in segment_bounds(tokenizer, text, opts.max_source_tokens):
            segments.append((d, a, text[a:b]))
    order = sorted(range(len(segments)), key=lambda s: len(segments[s][2]))
    calls: list[list[markup.PlacedCall]] = [[] for _ in texts]
    malformed = [0] * len(texts)
    for start in range(0, len(order), opts.batch_size):
        batch = [segments[s] for s in order[start:start + opts.batch_size]]
        for row in decoder.run([t for _, _, t in batch], stats):
            d, offset, _ = batch[row.index]
            for char, ids in row.calls:
                try:
                    placed = markup.PlacedCall(offset + char, decode_call(tokenizer, ids))
                except markup.MarkupError:
                    malformed[d] += 1
                    continue
                if placed in calls[d]:  # the same call again at the same place says nothing new
                    malformed[d] += 1
                else:
                    calls[d].append(placed)
    stats.calls_malformed += sum(malformed)
    stats.documents += len(texts)
    stats.seconds += time.perf_counter() - t0
    return [DecodedDocument(markup.Annotated(t, tuple(sorted(c, key=lambda pc: pc.offset))), m)
            for t, c, m in zip(texts, calls, malformed)]


@torch.no_grad()
def generate_unconstrained(model, tokenizer, text: str, max_new_tokens: int, stats: DecodeStats | None = None) -> str:
    """Plain greedy decoding of the annotated text (one token per forward pass, KV cache), as a server
    without constraints would produce it; for comparison only: its output may alter the source."""
    dec = _Decoder(model, tokenizer, DecodeOptions())
    cache = new_cache(model.config, growing=True)
    p = prompt_ids(tokenizer, text)
    ids = torch.tensor([p], device=dec.device)
    logits = dec.forward(ids, torch.ones_like(ids), torch.arange(len(p), device=dec.device)[None], cache)[0, -1]
    out, n = [], len(p)
    for _ in range(max_new_tokens):
        tok = int(logits.argmax())
        if tok == tokenizer.eos_token_id:
            break
        out.append(tok)
        n += 1
        step = torch.tensor([[tok]], device=dec.device)
        logits = dec.forward(step, torch.ones((1, n), dtype=torch.long, device=dec.device),
                             torch.tensor([[n - 1]], device=dec.device), cache)[0, -1]
        if stats is not None:
            stats.forward_passes += 1
            stats.fed_tokens += 1
    return tokenizer.decode(out, skip_special_tokens=False)
