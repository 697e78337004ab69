"""A reference causal LM for judging generated text: perplexity under it, and its hidden states as features
(MAUVE with a model the generator never used). By default the standard model of the LMLM issue's pretraining
(``make demo-lmlm``), found from its workdir, output folder, variant folder or checkpoint folder."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from models.device import device_of, resolve_device
from models.train import per_token_nll
from schemas.errors import UserInputError


_REFERENCE_LM_FIX = ("pass a folder holding a Hugging Face causal LM (config.json), a pretraining variant folder of "
                     "checkpoint-* folders, the workdir of `lmlm lmlm pretrain` (run `make demo-lmlm` first), or a hub name")


@dataclass
class ReferenceLM:
    """A causal LM loaded once for scoring many sample sets; ``path``: the folder (or hub name) it came from."""

    model: torch.nn.Module
    tokenizer: object
    path: str


def resolve_reference_lm(lm: str) -> str:
    """The folder (or hub name) of the causal LM that ``lm`` names: a folder holding one (config.json); a
    pretraining variant folder (its newest checkpoint); the output folder or workdir of `lmlm lmlm pretrain`
    (the standard model's newest checkpoint: the LMLM's own text carries lookup calls); else a hub name."""
    from models.train import latest_checkpoint

    folder = os.path.expanduser(lm)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    candidates = (folder, os.path.join(folder, "standard"), os.path.join(folder, "lmlm", "standard"))
    found = next((c for c in map(latest_checkpoint, candidates) if c), None)
    if found:
        return found
    if os.path.exists(folder) or os.path.isabs(folder) or folder.startswith(".") or folder.count("/") > 1:
        raise UserInputError(f"reference LM {lm!r}: no causal LM and no standard-model checkpoint there; {_REFERENCE_LM_FIX}")
    return lm


def load_reference_lm(lm: str, device: str | torch.device | None = "auto") -> ReferenceLM:
    """The causal LM that ``lm`` names (see ``resolve_reference_lm``), in eval mode, on ``device`` (auto: CUDA
    when available, else the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.train import quiet_progress

    path = resolve_reference_lm(lm)
    try:
        with quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as exc:
        what = "it" if path == lm else repr(path)
        raise UserInputError(f"reference LM {lm!r}: cannot load {what} ({str(exc).splitlines()[0]}); "
                             f"{_REFERENCE_LM_FIX}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # every text starts at position 0
    model.to(resolve_device(device)).eval()
    return ReferenceLM(model, tokenizer, path)


def perplexity(texts: list[str], lm: str | ReferenceLM, batch_size: int = 16) -> float:
    """Perplexity of ``texts`` under a causal LM (a loaded one, or anything ``load_reference_lm`` takes): exp of
    the mean loss over every token after each text's first; texts longer than the LM's context are scored on
    their first context-length tokens; nan when no text has two tokens."""
    ref = load_reference_lm(lm) if isinstance(lm, str) else lm
    model, tokenizer = ref.model, ref.tokenizer
    device = device_of(model)
    context = getattr(model.config, "max_position_embeddings", None)
    kept = [t for t in texts if t.strip()]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(kept), batch_size):
            enc = tokenizer(kept[i:i + batch_size], return_tensors="pt", padding=True, truncation=context is not None,
                            max_length=context).to(device)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)[:, 1:]
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1].float()
            loss = per_token_nll(logits, labels).sum()
            total, count = total + float(loss), count + int((labels != -100).sum())
    return math.exp(total / count) if count else float("nan")


def lm_features(texts: list[str], lm: ReferenceLM, batch_size: int = 32) -> np.ndarray:
    """Text features from a causal LM: its last hidden state averaged over each text's tokens (N, d), float32.
    MAUVE on these judges samples with a model the generator never used (the autoencoder reads MiniLM)."""
    model, tokenizer = lm.model, lm.tokenizer
    device = device_of(model)
    context = getattr(model.config, "max_position_embeddings", None)
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = [t if t.strip() else tokenizer.eos_token for t in texts[i:i + batch_size]]
            enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=context is not None,
                            max_length=context).to(device)
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()
            mask = enc["attention_mask"][..., None].float()
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 1), dtype=np.float32)
