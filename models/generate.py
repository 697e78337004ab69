"""Generation with live database lookups, keeping the KV cache across every lookup.

The model writes ``<|db_entity|> Napoleon<|db_relationship|> birthplace<|db_return|>``; at
``<|db_return|>`` the loop parses entity and relation, asks the lookup index, and feeds
`` Ajaccio<|db_end|>`` (the value, or ``unknown`` on a miss) through the model as forced tokens,
then the model goes on. The cache is kept: forced tokens cost what generated tokens cost, and
when every unfinished sequence of the batch has forced tokens waiting they go through in one
forward pass. The reference instead re-runs generation from scratch after every lookup; that
loop is kept as :func:`generate_regenerate_per_lookup` for comparison.

Batches are left-padded; each sequence has its own queue of forced tokens, so sequences that look
something up and sequences that generate share each step. Greedy batched output equals greedy
one-at-a-time output (up to floating-point ties).

With an index that constrains decoding (its ``allowed_next`` is not None, as for :class:`lookup.KeyTrie`),
decoding inside a call is constrained so that only keys in the database can be written (prefix-tree
constrained decoding).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

import torch

from lookup import LookupIndex, LookupResult
from models.kv_cache import cache_keyword, new_cache
from models.tokenizer import lookup_token_ids
from schemas.errors import UserInputError
from schemas.markup import DB_END, DB_ENTITY, SPECIAL_TOKENS, mention_span, parse_lenient, strip


_MALFORMED_CALL = re.compile(re.escape(DB_ENTITY) + ".*?" + re.escape(DB_END), re.DOTALL)
_STRAY_TOKEN = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))


@dataclass(frozen=True)
class DatabaseCall:
    """One lookup made during generation: the key as the model wrote it, and the database's answer."""

    entity: str
    relation: str
    result: LookupResult

    @property
    def value(self) -> str:
        return self.result.value

    @property
    def sources(self) -> list[str]:
        return self.result.sources

    @property
    def hit(self) -> bool:
        return self.result.hit


@dataclass
class GenerationResult:
    """The continuation of one prompt (the prompt itself is not repeated)."""

    text: str  # with the call markup when show_calls, else == text_without_calls
    text_without_calls: str
    lookups: list[DatabaseCall] = field(default_factory=list)
    n_tokens: int = 0  # new tokens: generated ones and the looked-up values fed in


def generate(model, tokenizer, prompts: list[str], lookup: LookupIndex | None = None, *, max_new_tokens: int = 64,
             show_calls: bool = True, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_at_eos: bool = True) -> list[GenerationResult]:
    """Continue each prompt, answering every call from ``lookup`` (a :class:`lookup.LookupIndex`: exact,
    fuzzy or the key trie; None generates without lookups), keeping the KV cache.

    ``temperature=0`` is greedy; otherwise sampling, optionally restricted to ``top_k`` tokens and
    the ``top_p`` nucleus (``seed`` makes it repeatable). ``max_new_tokens`` counts every new token,
    looked-up values included; a value being fed in is always finished, so no call is left open by it.
    A prompt that ends in ``<|db_return|>`` gets its lookup before anything is generated.
    """
    return _decode(model, tokenizer, prompts, lookup, max_new_tokens=max_new_tokens, show_calls=show_calls,
                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_at_eos=stop_at_eos,
                   regenerate_per_lookup=False)


def generate_regenerate_per_lookup(model, tokenizer, prompts: list[str], lookup, *, max_new_tokens: int = 64,
                                   show_calls: bool = True, stop_at_eos: bool = True) -> list[GenerationResult]:
    """The reference's loop, for comparison: greedy decoding that stops the batch at every lookup,
    appends the values, and starts again from scratch (a new prefill, no kept cache). Same output
    as greedy :func:`generate`."""
    return _decode(model, tokenizer, prompts, lookup, max_new_tokens=max_new_tokens, show_calls=show_calls,
                   temperature=0.0, top_k=None, top_p=None, seed=None, stop_at_eos=stop_at_eos,
                   regenerate_per_lookup=True)


class _Sequence:
    """Decoding state of one prompt: its tokens, forced tokens waiting, and the open call, if any."""

    def __init__(self, prompt_ids: list[int], special):
        self.ids: list[int] = []
        self.special = special
        self.pending: deque[int] = deque()
        self.open_call: int | None = None  # index in ids of the <|db_entity|> of an unfinished call
        self.finished = False
        self.calls: list[DatabaseCall] = []
        closed = None
        for tok in prompt_ids:
            closed = self.append(tok)
        self.prompt_call = closed  # the prompt ends in <|db_return|>: its call is answered first
        self.n_prompt = len(self.ids)

    def append(self, tok: int) -> int | None:
        """Append a token; when it is the <|db_return|> that ends a call's key, the index of the call's start."""
        self.ids.append(tok)
        if tok == self.special.entity:
            self.open_call = len(self.ids) - 1
        elif tok == self.special.ret and self.open_call is not None:
            start, self.open_call = self.open_call, None
            return start
        return None

    @property
    def n_new(self) -> int:
        return len(self.ids) - self.n_prompt


def _decode(model, tokenizer, prompts, lookup, *, max_new_tokens, show_calls, temperature, top_k, top_p, seed,
            stop_at_eos, regenerate_per_lookup) -> list[GenerationResult]:
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens {max_new_tokens}: must be at least 1")
    special = lookup_token_ids(tokenizer)
    # an index that constrains decoding answers allowed_next; the others answer None
    constraint = lookup if lookup is not None and lookup.allowed_next([]) is not None else None
    eos = tokenizer.eos_token_id if stop_at_eos else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    if any(not ids for ids in encoded):
        raise UserInputError("generate: every prompt needs at least one token; got an empty prompt")
    seqs = [_Sequence(ids, special) for ids in encoded]
    if lookup is not None:
        _answer_calls(tokenizer, lookup, special, [(s, s.prompt_call) for s in seqs if s.prompt_call is not None])
    generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    device = next(model.parameters()).device
    cache_arg = cache_keyword(model)

    with torch.inference_mode():
        while not all(s.finished for s in seqs):
            if regenerate_per_lookup:  # the values looked up become part of a new prefill
                for s in seqs:
                    if s.pending:
                        s.ids.extend(s.pending)
                        s.pending.clear()
                        s.finished = s.n_new >= max_new_tokens
                if all(s.finished for s in seqs):
                    break
            # prefill: every sequence's tokens so far, left-padded
            width = max(len(s.ids) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, width - len(s.ids):] = torch.tensor(s.ids)
                mask[row, width - len(s.ids):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = new_cache(model.config)
            logits = _forward(model, ids, mask, positions, cache, cache_arg, device)
            next_position = positions[:, -1] + 1
            while True:
                # each step feeds every sequence one token, or, when every unfinished sequence has
                # forced tokens waiting, as many of them as all have
                waiting = [len(s.pending) for s in seqs if not s.finished]
                chunk = min(waiting) if all(waiting) else 1
                step = torch.full((len(seqs), chunk), pad, dtype=torch.long)
                # greedy and unconstrained: one argmax for the whole batch
                greedy = logits.argmax(-1).tolist() if temperature <= 0 and constraint is None else None
                called = []
                for row, s in enumerate(seqs):
                    if s.finished:
                        continue
                    if s.pending:
                        new = [s.pending.popleft() for _ in range(chunk)]
                    elif greedy is not None:
                        new = [greedy[row]]
                    else:
                        new = [_choose(logits[row], s, special, constraint, temperature, top_k, top_p, generator)]
                    starts = [start for tok in new if (start := s.append(tok)) is not None and lookup is not None]
                    if starts:
                        called.append((s, starts[-1]))
                    step[row] = torch.tensor(new)
                    done = (eos is not None and new[-1] == eos) or s.n_new >= max_new_tokens
                    s.finished = done and not s.pending and not starts
                _answer_calls(tokenizer, lookup, special, called)
                if all(s.finished for s in seqs) or (regenerate_per_lookup and called):
                    break
                mask = torch.cat([mask, torch.ones((len(seqs), chunk), dtype=torch.long)], dim=1)
                positions = next_position[:, None] + torch.arange(chunk)[None, :]
                next_position = next_position + chunk
                logits = _forward(model, step, mask, positions, cache, cache_arg, device)
    return [_result(tokenizer, s, eos, show_calls) for s in seqs]


def _forward(model, ids, mask, positions, cache, cache_arg, device) -> torch.Tensor:
    """Logits (batch, vocab) at the last input position; the cache grows by the input."""
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=True, logits_to_keep=1, **{cache_arg: cache})
    return out.logits[:, -1, :].float().cpu()


def _choose(logits: torch.Tensor, s: _Sequence, special, constraint: LookupIndex | None, temperature, top_k,
            top_p, generator) -> int:
    """The next token of one sequence: greedy or sampled, inside a call restricted to the constraint's keys."""
    if constraint is not None:
        logits = logits.clone()
        if s.open_call is not None:
            allowed = constraint.allowed_next(s.ids[s.open_call + 1:])
            if allowed:  # a prompt's partial call that no key extends goes unconstrained
                keep = logits[allowed]
                logits.fill_(float("-inf"))
                logits[allowed] = keep
        else:  # outside a call only <|db_entity|> may start one, and only when there are keys
            logits[[special.relationship, special.ret]] = float("-inf")
            if not constraint.allowed_next([]):  # no key at all
                logits[special.entity] = float("-inf")
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def _parse_key(tokenizer, ids: list[int], special) -> tuple[str, str] | None:
    """(entity, relation) of the call ``ids`` (the tokens between <|db_entity|> and <|db_return|>), or None if malformed."""
    if ids.count(special.relationship) != 1:
        return None
    cut = ids.index(special.relationship)
    entity = tokenizer.decode(ids[:cut], clean_up_tokenization_spaces=False).strip()
    relation = tokenizer.decode(ids[cut + 1:], clean_up_tokenization_spaces=False).strip()
    if not entity or not relation or any(t in (special.entity, special.ret, special.end) for t in ids):
        return None
    return entity, relation


def _answer_calls(tokenizer, lookup, special, called: list[tuple[_Sequence, int]]) -> None:
    """Look up the key of every sequence that just wrote <|db_return|> (one batched lookup; ``start``
    is where its call began) and queue " value<|db_end|>" to be fed; a malformed call gets "unknown"."""
    if not called:
        return
    keys = [_parse_key(tokenizer, s.ids[start + 1:-1], special) for s, start in called]
    found = iter(lookup.lookup_batch([k for k in keys if k is not None]))
    for (s, _), key in zip(called, keys):
        result = next(found) if key is not None else LookupResult.miss()
        value_ids = tokenizer(" " + result.value, add_special_tokens=False)["input_ids"]
        s.pending.extend([*value_ids, special.end])
        s.calls.append(DatabaseCall(*(key or ("", "")), result))


def _result(tokenizer, s: _Sequence, eos, show_calls: bool) -> GenerationResult:
    new = s.ids[s.n_prompt:]
    if eos is not None and new and new[-1] == eos:
        new = new[:-1]
    prompt = tokenizer.decode(s.ids[:s.n_prompt], clean_up_tokenization_spaces=False)
    text = tokenizer.decode(new, clean_up_tokenization_spaces=False)
    # strip with the prompt, since a call the prompt opened ends in the continuation
    without = _without_calls(prompt + text)[len(_without_calls(prompt)):]
    return GenerationResult(text if show_calls else without, without, s.calls, len(s.ids) - s.n_prompt)


def _without_calls(text: str) -> str:
    """``text`` with no lookup markup: calls removed (malformed ones too), a call left open at the
    end cut off, and stray lookup tokens a model wrote outside any call dropped."""
    text = _MALFORMED_CALL.sub("", strip(text))
    if DB_ENTITY in text:
        text = text[:text.index(DB_ENTITY)]
    return _STRAY_TOKEN.sub("", text)


def cite(result: GenerationResult) -> str:
    """The text without calls, each looked-up value's mention followed by [n], then one line per
    citation: ``[n] entity / relation -> value: sources`` (or "not in the database").

    Needs the result of a generation with ``show_calls=True`` (the calls say where each value goes).
    """
    text = result.text
    if result.lookups and DB_ENTITY not in text:
        raise UserInputError("cite: generate with show_calls=True to cite the looked-up values")
    if DB_ENTITY in strip(text):  # a call the token limit cut off
        text = text[:text.rindex(DB_ENTITY)]
    ann, _ = parse_lenient(text)
    calls = iter(result.lookups)
    inserts, notes = [], []
    for placed in ann.calls:
        made = next((c for c in calls if c.value == placed.call.value), None)
        if made is None:
            continue
        n = len(notes) + 1
        span = mention_span(ann.text, placed.offset, placed.call.value)
        inserts.append((span[1] if span else placed.offset, f"[{n}]"))
        where = ", ".join(made.sources) if made.sources else ("no source recorded" if made.hit else "not in the database")
        notes.append(f"[{n}] {made.entity} / {made.relation} -> {made.value}: {where}")
    out = ann.text
    for offset, mark in sorted(inserts, reverse=True):
        out = out[:offset] + mark + out[offset:]
    return out + ("\n\n" + "\n".join(notes) if notes else "")


def generate_batched(model, tokenizer, prompts: list[str], lookup, max_new_tokens: int, batch_size: int,
              document_start: bool = False) -> list[GenerationResult]:
    """Greedy generation in batches of similar prompt length; results in prompt order. With
    ``document_start`` each prompt follows an end-of-text token, as a document's opening does in
    pretraining and perplexity scoring; else it is running text, as a packed block can start anywhere."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[GenerationResult | None] = [None] * len(prompts)
    eos = (tokenizer.eos_token or "") if document_start else ""
    for k in range(0, len(order), batch_size):
        chunk = order[k:k + batch_size]
        for i, r in zip(chunk, generate(model, tokenizer, [eos + prompts[i] for i in chunk], lookup,
                                        max_new_tokens=max_new_tokens, show_calls=True)):
            out[i] = r
    return out
