"""Fine-tuning the small annotator (:mod:`models.annotator`) on its training examples.

Every target token gets the full softmax (the default): copying the source is the signal from which
the model learns to copy entities and values into its calls, and an unconstrained server needs it.
With the decision loss, a source position is trained only as the two-way choice constrained decoding
makes there (next source token vs ``<|db_entity|>``); measured on the synthetic corpus, that starves
the copy signal (held-out triplet F1 0.00 vs 0.71 with the full loss, same data and time).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.annotator import Example
from models.train import adamw, autocast, autocast_dtype, log_step, lr_at
from schemas import progress
from schemas.errors import UserInputError


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
    with autocast(ids.device, amp):
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
    optimizer = adamw(model, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))

    history, step, seen, t0 = [], 0, 0, time.perf_counter()
    model.train()
    queue: list[list[Example]] = []
    while step < total:
        if not queue:
            queue = _batches(train, batch_size, rng)
        batch = queue.pop()
        # a time budget ends the run early: decay over whichever ends first
        spent = 0.0 if stop_after_s is None else (time.perf_counter() - t0) / stop_after_s
        step_lr = lr_at(step, lr=lr, warmup_steps=warmup_steps, total_steps=total, min_lr=min_lr, time_spent=spent)
        for g in optimizer.param_groups:
            g["lr"] = step_lr
        s, n = target_loss(model, *_collate(batch, pad, device), amp, decision_loss)
        (s / n.clamp(min=1)).backward()
        s = s.detach()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, seen = step + 1, seen + int(n)
        progress.update("fine-tune", step, total, "steps")
        history.append({"step": step, "epoch": step / steps_per_epoch, "loss": float(s) / max(int(n), 1),
                        "lr": step_lr})
        if step % 20 == 0 or step == total:
            log_step(log, step, total, history[-1]["loss"], f"({time.perf_counter() - t0:.0f} s)", label="fine-tune")
        if holdout and (step % eval_every == 0 or step == total):
            history.append({"step": step, "epoch": step / steps_per_epoch,
                            "holdout_loss": holdout_loss(model, holdout, pad, amp=amp, decision_loss=decision_loss)})
        if stop_after_s is not None and time.perf_counter() - t0 > stop_after_s:
            log(f"fine-tune: time budget of {stop_after_s:.0f} s spent at step {step}/{total}")
            break
    model.eval()
    return FinetuneResult(step, step / steps_per_epoch, seen, time.perf_counter() - t0, history)
