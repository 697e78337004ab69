"""The small annotator: a causal LM that copies a document with lookup calls inserted, its
fine-tuning loop, and decoding that cannot alter the source.

One training example (token ids)::

    <|endoftext|> source tokens <|endoftext|> annotated tokens <|endoftext|>
    '------------ prompt (no loss) ---------' '-------- target (loss) ------'

The annotated tokens are the canonical markup (``schemas.markup.render``): source pieces with
``<|db_entity|> e<|db_relationship|> r<|db_return|> v<|db_end|>`` between them, each special token one id.
Every target token gets the full softmax (the default): copying the source is the signal from which
the model learns to copy entities and values into its calls, and an unconstrained server needs it.
With the decision loss, a source position is trained only as the two-way choice constrained decoding
makes there (next source token vs ``<|db_entity|>``); measured on the synthetic corpus, that starves
the copy signal (held-out triplet F1 0.00 vs 0.71 with the full loss, same data and time).

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

import functools
import inspect
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.tokenizer import END_OF_TEXT, lookup_token_ids, save_tokenizer
from schemas import markup
from schemas.errors import UserInputError

ANNOTATOR_META = "annotator.json"  # format + training summary, beside the Hugging Face files
FORMAT = "lmlm-annotator-v1"
# vLLM's chat endpoint renders this: the last user message is the source, as in training
CHAT_TEMPLATE = "{{ eos_token }}{{ messages[-1]['content'] }}{{ eos_token }}"

SOURCE, ENTITY, RELATION, VALUE = range(4)


# ----------------------------------------------------------------------------- examples


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, source: str) -> list[int]:
    eos = tokenizer.eos_token_id
    return [eos, *encode(tokenizer, source), eos]


def target_ids(tokenizer, annotated: markup.Annotated) -> list[int]:
    """Annotated tokens + end-of-text; special tokens split the text, so each piece tokenizes alone."""
    return [*encode(tokenizer, markup.render(annotated)), tokenizer.eos_token_id]


def segment_bounds(tokenizer, text: str, max_tokens: int) -> list[tuple[int, int]]:
    """Character ranges covering ``text`` of at most ``max_tokens`` tokens each, cut after sentence ends
    (before the following whitespace, where no call sits inside a mention) when possible."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, _ in enc["offset_mapping"]]
    if len(starts) <= max_tokens:
        return [(0, len(text))]
    import bisect
    import re

    cuts = [m.end() for m in re.finditer(r"[.!?]['\")\]]?(?=\s)|(?=\n)", text)]
    bounds, a = [], 0
    while a < len(text):
        ta = bisect.bisect_left(starts, a)
        if len(starts) - ta <= max_tokens:
            bounds.append((a, len(text)))
            break
        limit = starts[ta + max_tokens]  # first character that no longer fits
        ok = [c for c in cuts if a < c <= limit]
        b = ok[-1] if ok else limit
        if b <= a:
            b = limit
        bounds.append((a, b))
        a = b
    return bounds


def split_annotated(ann: markup.Annotated, bounds: list[tuple[int, int]]) -> list[markup.Annotated]:
    """``ann`` cut at ``bounds``; a call at a cut belongs to the segment it precedes."""
    out = []
    for k, (a, b) in enumerate(bounds):
        last = k == len(bounds) - 1
        calls = tuple(markup.PlacedCall(pc.offset - a, pc.call) for pc in ann.calls
                      if a <= pc.offset and (pc.offset < b or (last and pc.offset == b)))
        out.append(markup.Annotated(ann.text[a:b], calls))
    return out


@dataclass
class Example:
    ids: list[int]
    n_prompt: int  # loss on ids[n_prompt:] only
    # per position, the other token constrained decoding weighs against ids[k] (a source token against
    # <|db_entity|>, <|db_entity|> against the source token after the call); -1 inside calls and at the end
    rival: list[int] | None = None


def decision_rivals(ids: list[int], n_prompt: int, entity: int, end: int) -> list[int]:
    """:attr:`Example.rival` of a prompt + target sequence."""
    rival = [-1] * len(ids)
    inside = False
    for k in range(n_prompt, len(ids) - 1):  # the last target token (end-of-text) stays a full softmax
        t = ids[k]
        if not inside and t == entity:
            j = k
            while j < len(ids) and ids[j] == entity:  # the source token after this call (and any that follow)
                while ids[j] != end:
                    j += 1
                j += 1
            rival[k] = ids[j] if j < len(ids) - 1 else -1
            inside = True
        elif inside:
            inside = t != end
        else:
            rival[k] = entity
    return rival


def build_examples(tokenizer, docs: list[markup.Annotated], max_source_tokens: int) -> list[Example]:
    """Training examples of annotated documents, long ones cut into segments of ``max_source_tokens``."""
    ids = lookup_token_ids(tokenizer)
    out = []
    for ann in docs:
        for seg in split_annotated(ann, segment_bounds(tokenizer, ann.text, max_source_tokens)):
            p = prompt_ids(tokenizer, seg.text)
            seq = p + target_ids(tokenizer, seg)
            out.append(Example(seq, len(p), decision_rivals(seq, len(p), ids.entity, ids.end)))
    return out


# ----------------------------------------------------------------------------- fine-tuning


@dataclass
class FinetuneResult:
    steps: int
    epochs: float
    target_tokens: int  # loss-bearing tokens seen
    seconds: float
    history: list[dict] = field(default_factory=list)  # {"step","epoch","loss","lr"} and {"step","holdout_loss"}


def _batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Shuffled batches of similar length (less padding): sort within windows of 50 batches."""
    order = list(examples)
    rng.shuffle(order)
    window = 50 * batch_size
    batches = []
    for w in range(0, len(order), window):
        part = sorted(order[w:w + window], key=lambda e: len(e.ids))
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(batch: list[Example], pad: int, device):
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    target = torch.zeros((len(batch), width), dtype=torch.bool)
    rival = torch.full((len(batch), width), -1, dtype=torch.long)
    for r, e in enumerate(batch):
        ids[r, :len(e.ids)] = torch.tensor(e.ids)
        attn[r, :len(e.ids)] = 1
        target[r, e.n_prompt:len(e.ids)] = True
        if e.rival is not None:
            rival[r, :len(e.ids)] = torch.tensor(e.rival)
    return ids.to(device), attn.to(device), target.to(device), rival.to(device)


def target_loss(model, ids: torch.Tensor, attn: torch.Tensor, target: torch.Tensor, rival: torch.Tensor,
                amp: torch.dtype | None = None, decision_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss over target positions, their number); ``amp``: autocast dtype.

    With ``decision_loss``, a source position is scored the way constrained decoding uses it: the true
    token against its one rival (a two-way softmax), so the model spends no capacity on copying text it
    is never asked to write; call tokens get the full softmax.
    """
    with torch.autocast(ids.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(input_ids=ids, attention_mask=attn).logits
    keep = target[:, 1:]
    logits, nxt, riv = logits[:, :-1].float(), ids[:, 1:], rival[:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1), nxt.flatten(), reduction="none").view_as(nxt)
    if decision_loss:
        two_way = riv >= 0
        true = logits.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        other = logits.gather(-1, riv.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll = torch.where(two_way, F.softplus(other - true), nll)
    return (nll * keep).sum(), keep.sum()


@torch.no_grad()
def holdout_loss(model, examples: list[Example], pad: int, batch_size: int = 8, amp: torch.dtype | None = None,
                 decision_loss: bool = False) -> float:
    """Mean target-token loss over ``examples``."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        s, k = target_loss(model, *_collate(examples[i:i + batch_size], pad, device), amp, decision_loss)
        total, n = total + float(s), n + int(k)
    model.train(was)
    return total / max(n, 1)


def finetune(model, tokenizer, train: list[Example], *, epochs: float, batch_size: int, lr: float,
             min_lr: float, warmup_steps: int, weight_decay: float = 0.1, grad_clip: float | None = 1.0,
             seed: int = 0, holdout: list[Example] | None = None, eval_every: int = 100,
             log=print, stop_after_s: float | None = None, bf16: str | bool = False,
             decision_loss: bool = False) -> FinetuneResult:
    """Train ``model`` in place on ``train`` (loss on the target only) with AdamW and a cosine schedule.

    ``stop_after_s`` ends training early when a time budget is spent (the cosine decay then follows
    elapsed time, so the run still ends at ``min_lr``); the result says how many epochs were done. ``bf16``: autocast (auto: where the CPU or GPU
    has native bfloat16).
    """
    from models.train import autocast_dtype

    if not train:
        raise UserInputError("fine-tuning: no training examples; the seed shards hold no annotated documents")
    device = next(model.parameters()).device
    amp = autocast_dtype(bf16, device)
    pad = tokenizer.eos_token_id
    rng = random.Random(seed)
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        if stop_after_s is not None:  # a time budget ends the run early: decay over whichever ends first
            progress = max(progress, min(1.0, (time.perf_counter() - t0) / stop_after_s))
        return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)

    history, step, seen, t0 = [], 0, 0, time.perf_counter()
    model.train()
    queue: list[list[Example]] = []
    while step < total:
        if not queue:
            queue = _batches(train, batch_size, rng)
        batch = queue.pop()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step)
        s, n = target_loss(model, *_collate(batch, pad, device), amp, decision_loss)
        (s / n.clamp(min=1)).backward()
        s = s.detach()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, seen = step + 1, seen + int(n)
        history.append({"step": step, "epoch": step / steps_per_epoch, "loss": float(s) / max(int(n), 1),
                        "lr": lr_at(step - 1)})
        if step % 20 == 0 or step == total:
            log(f"fine-tune step {step}/{total} loss {history[-1]['loss']:.4f} ({time.perf_counter() - t0:.0f} s)")
        if holdout and (step % eval_every == 0 or step == total):
            history.append({"step": step, "epoch": step / steps_per_epoch,
                            "holdout_loss": holdout_loss(model, holdout, pad, amp=amp, decision_loss=decision_loss)})
        if stop_after_s is not None and time.perf_counter() - t0 > stop_after_s:
            log(f"fine-tune: time budget of {stop_after_s:.0f} s spent at step {step}/{total}")
            break
    model.eval()
    return FinetuneResult(step, step / steps_per_epoch, seen, time.perf_counter() - t0, history)


# ----------------------------------------------------------------------------- checkpoints


def save_annotator(model, tokenizer, out_dir: str, meta: dict) -> str:
    """A Hugging Face folder (safetensors) that ``AutoModelForCausalLM`` and ``vllm serve`` load.

    The lookup tokens are saved as added *non-special* tokens so that servers which skip special
    tokens when detokenizing (vLLM's default) still return the markup; they stay single ids.
    """
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    save_tokenizer(tokenizer, out_dir)
    tok_path = os.path.join(out_dir, "tokenizer.json")
    with open(tok_path) as f:
        tok = json.load(f)
    for added in tok.get("added_tokens", []):
        if added["content"] in markup.SPECIAL_TOKENS:
            added["special"] = False
    with open(tok_path, "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(cfg.get(key), list):
            cfg[key] = [t for t in cfg[key] if t not in markup.SPECIAL_TOKENS]
    for entry in (cfg.get("added_tokens_decoder") or {}).values():
        if entry.get("content") in markup.SPECIAL_TOKENS:
            entry["special"] = False
    cfg.setdefault("chat_template", CHAT_TEMPLATE)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, ANNOTATOR_META), "w") as f:
        json.dump({"format": FORMAT, **meta}, f, indent=2, default=str)
    return out_dir


def load_annotator(path: str, device: str | None = None):
    """(model, tokenizer, meta) of a folder written by :func:`save_annotator` (merged weights), or of a
    LoRA adapter folder (``adapter_config.json``; needs ``peft``)."""
    from transformers import AutoModelForCausalLM

    from models.tokenizer import load_tokenizer

    if not os.path.isdir(path):
        raise UserInputError(f"annotator checkpoint {path!r}: no such folder; run the fine-tune flow first "
                             "(`lmlm annotator finetune`) or point to a save_pretrained folder")
    meta_path = os.path.join(path, ANNOTATOR_META)
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    tokenizer = load_tokenizer(path)
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        try:
            from peft import AutoPeftModelForCausalLM
        except ImportError as exc:
            raise UserInputError(f"annotator {path!r} is a LoRA adapter: install peft to load it") from exc
        model = AutoPeftModelForCausalLM.from_pretrained(path).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    from models.device import resolve_device

    return model.to(resolve_device(device)).eval(), tokenizer, meta


# ----------------------------------------------------------------------------- decoding


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
        self.cache_arg = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"
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

    def new_cache(self):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:
            return DynamicCache()
        if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
            cache.layers = [_growing_layer()() for _ in cache.layers]
        return cache

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
        cache = self.new_cache()
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
        gather = index.to(self.device)[:, None, :, None]
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, t.gather(2, gather.expand(-1, t.shape[1], -1, t.shape[3])))
        return new_valid


@functools.cache
def _growing_layer():
    """A KV-cache layer that appends into spare capacity (doubling) instead of concatenating the whole
    cache on every forward pass, as transformers' DynamicLayer does; the keys/values it returns are views.
    Anything that replaces ``keys``/``values`` (batch selection, compaction) starts a new buffer."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, add = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
            buf = getattr(self, "_buffers", None)
            if buf is None or self.keys is not self._views[0] or n + add > buf[0].shape[-2]:
                cap = max(2 * (n + add), 256)
                buf = []
                for old, new in ((self.keys, key_states), (self.values, value_states)):
                    b = new.new_empty((*new.shape[:-2], cap, new.shape[-1]))
                    if n:
                        b[..., :n, :] = old
                    buf.append(b)
                self._buffers = buf
            self._buffers[0][..., n:n + add, :] = key_states
            self._buffers[1][..., n:n + add, :] = value_states
            self._views = (self._buffers[0][..., :n + add, :], self._buffers[1][..., :n + add, :])
            self.keys, self.values = self._views
            return self.keys, self.values

    return GrowingLayer


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
    cache = dec.new_cache()
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


__all__ = [
    "END_OF_TEXT", "Example", "DecodeOptions", "DecodeStats", "DecodedDocument", "FinetuneResult",
    "annotate_texts", "build_examples", "finetune", "generate_unconstrained", "holdout_loss", "load_annotator",
"prompt_ids", "save_annotator", "segment_bounds", "split_annotated", "target_ids",
]
