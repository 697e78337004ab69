"""The small annotator: a causal LM that copies a document with lookup calls inserted. This module
holds its training examples and its checkpoints; fine-tuning is :mod:`models.annotator_finetune`,
decoding that cannot alter the source :mod:`models.annotator_decode`.

One training example (token ids)::

    <|endoftext|> source tokens <|endoftext|> annotated tokens <|endoftext|>
    '------------ prompt (no loss) ---------' '-------- target (loss) ------'

The annotated tokens are the canonical markup (``schemas.markup.render``): source pieces with
``<|db_entity|> e<|db_relationship|> r<|db_return|> v<|db_end|>`` between them, each special token one id.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from models.tokenizer import END_OF_TEXT, lookup_token_ids, save_tokenizer
from schemas import markup
from schemas.errors import UserInputError

ANNOTATOR_META = "annotator.json"  # format + training summary, beside the Hugging Face files
FORMAT = "lmlm-annotator-v1"
# vLLM's chat endpoint renders this: the last user message is the source, as in training
CHAT_TEMPLATE = "{{ eos_token }}{{ messages[-1]['content'] }}{{ eos_token }}"


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


__all__ = [
    "END_OF_TEXT", "Example", "build_examples", "decision_rivals", "load_annotator", "prompt_ids", "save_annotator",
    "segment_bounds", "split_annotated", "target_ids",
]
