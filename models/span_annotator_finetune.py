"""Fine-tuning the encoder annotator (``models/span_annotator.py``): length-bucketed batches of training windows,
the frozen bottom layers' output cached once, AdamW with a learning rate for the encoder and one for the heads,
the schedule of ``models.train.lr_at`` decayed over the epochs or the time budget, whichever ends first.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from models.span_annotator import IGNORE, SpanAnnotator
from models.span_examples import Example
from models.train import autocast, autocast_dtype, lr_at
from schemas import progress
from schemas.errors import UserInputError

def collate(examples: list[Example], relation_index: dict[int, int], device,
            name_index: dict[tuple[int, ...], int] | None = None) -> dict:
    """Pad a list of windows into tensors; calls flattened over the batch with the window they belong to; with
    ``name_index`` (``RelationNames.name_rows``) each call's row among the seed's relation names."""
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
    if name_index is not None:
        batch["name"] = as_long(name_index.get(tuple(c[5][:-1]), IGNORE) for c in calls)
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
                         weights: dict[str, float] | None = None, name_rows: dict[tuple[int, ...], int] | None = None,
                         log=print) -> TrainResult:
    """AdamW on the sum of the heads' losses (``name_rows``, the name scorer's targets from
    ``RelationNames.name_rows``, is required when the model has a name table); cosine decay over ``epochs`` or, when
    ``stop_after_s`` comes first, over the time budget (so a budgeted run still ends at a low learning rate). The
    embeddings (12M of the 29M parameters; the word pieces' are shared with the relation decoder) and
    ``frozen_layers`` bottom layers of the encoder stay as pretrained. ``clock`` measures the budget (e.g. process
    CPU seconds per thread, which a shared machine's other jobs do not inflate as much as wall time)."""
    if not train:
        raise UserInputError("fine-tuning: no training windows; the seed shards hold no annotated documents")
    device = next(model.parameters()).device
    amp = autocast_dtype(bf16, device)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    index = {int(t): k for k, t in enumerate(model.relation_vocab.tolist())}
    if model.name_table.shape[0] and not name_rows:
        raise ValueError("train_span_annotator: the model scores relation names but no name_rows were given "
                         "(pass names.name_rows(tokenizer, model.cfg.max_relation_tokens))")
    steps_per_epoch = len(_batches(train, batch_tokens, random.Random(seed)))
    total = max(1, round(epochs * steps_per_epoch))
    model.freeze_layers(frozen_layers)
    enc = [p for n, p in model.named_parameters() if n.startswith("encoder.") and p.requires_grad]
    heads = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    groups = [{"params": [p for p in enc if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay, "base": lr},
              {"params": [p for p in enc if p.dim() < 2], "lr": lr, "weight_decay": 0.0, "base": lr},
              {"params": heads, "lr": head_lr, "weight_decay": weight_decay, "base": head_lr}]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98))
    weights = {"tags": 2.0, "entity": 0.5, "relation": 1.0, "name": 1.0, **(weights or {})}
    t0, w0 = clock(), time.perf_counter()
    if frozen_layers:  # counted in the budget
        model.eval()
        cache_lower(model, train, frozen_layers)
        log(f"fine-tune: the {frozen_layers} frozen encoder layers' output cached ({time.perf_counter() - w0:.0f} s)")

    def scale(step: int) -> float:  # the multiplier of both peak learning rates, down to 2% at the end
        spent = (clock() - t0) / stop_after_s if stop_after_s else 0.0
        return lr_at(step, lr=1.0, warmup_steps=warmup_steps, total_steps=total, min_lr_ratio=0.02, time_spent=spent)

    history, step, queue = [], 0, []
    model.train()
    while step < total:
        if not queue:
            queue = _batches(train, batch_tokens, rng)
        batch = collate(queue.pop(), index, device, name_rows)
        if frozen_layers:
            batch["frozen_layers"] = frozen_layers
        s = scale(step)
        for g in optimizer.param_groups:
            g["lr"] = g["base"] * s
        with autocast(device, amp):
            losses = model(batch)
        loss = sum(w * losses[k] for k, w in weights.items())
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update("fine-tune", step, total, "steps")
        history.append({"step": step, "epoch": step / steps_per_epoch, "loss": float(loss.detach()), "lr": lr * s,
                        **{k: round(float(v.detach()), 4) for k, v in losses.items()}})
        if step % 20 == 0 or step == total:
            avg = {k: sum(h[k] for h in history[-20:]) / len(history[-20:]) for k in ("loss", *losses)}
            log(f"fine-tune step {step}/{total} loss {avg['loss']:.3f} (tags {avg['tags']:.3f}, entity "
                f"{avg['entity']:.3f}, relation {avg['relation']:.3f}, name {avg['name']:.3f}) "
                f"({time.perf_counter() - w0:.0f} s)")
        if stop_after_s is not None and clock() - t0 > stop_after_s:
            log(f"fine-tune: time budget of {stop_after_s:.0f} s spent at step {step}/{total}")
            break
    model.eval()
    for e in train:
        e.lower = None
    return TrainResult(step, step / steps_per_epoch, time.perf_counter() - w0, history, clock() - t0)
