"""LMLM pretraining: packed blocks streamed from shards, AdamW, cosine schedule, checkpoints that
resume exactly, and ``torchrun`` data parallelism; on the training-loop core of :mod:`models.train`.

Reads like nanoGPT's train.py on purpose: one loop, no framework between the reader and the maths.

- Data: documents (tokenized, end-of-text after each) are packed into blocks of ``block_length``
  tokens; consecutive blocks overlap by one token so every token is a target exactly once. The
  stream's position (epoch, shard, row, the tokens carried over) is part of every checkpoint.
- Loss: summed cross-entropy over trained targets (the LMLM loss mask) divided by the number of
  trained targets in the whole optimizer step, across micro-batches and processes, so gradient
  accumulation and data parallelism give the same update as one big batch.
- Checkpoint: ``checkpoint-<step>/`` = ``save_pretrained`` safetensors model + tokenizer +
  ``trainer_state.pt`` (optimizer, scheduler, step, data position and RNG states of every process).
  Training N steps straight equals training k, stopping, and resuming to N.
- Data parallel: launched with ``torchrun --nproc_per_node G ...`` (``WORLD_SIZE`` > 1) each process
  reads every G-th document and gradients are averaged by DDP (nccl on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from models.kv_cache import cpu_bf16_attention
from models.lmlm import loss_mask, masked_nll
from models.tokenizer import LookupTokenIds
from models.train import (
    DistributedRuntime,
    adamw,
    autocast,
    autocast_dtype,
    checkpoint_path,
    load_trainer_state,
    log_step,
    lr_at,
    restore,
    resumable_state,
    save_checkpoint,
)
from schemas import progress
from schemas.configs import PretrainConfig
from schemas.errors import UserInputError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data


class PackedBlocks:
    """An endless, resumable stream of (input_ids, mask) blocks of ``block_length`` tokens.

    Each epoch visits the shards in a seeded random order and the rows of each shard in a seeded
    random order; this process takes every ``world_size``-th row from ``rank``. ``read_texts(shard)``
    returns the shard's training texts (the caller picks the column and drops held-out documents).
    ``state_dict()`` / ``load_state_dict()`` capture the exact position.
    """

    def __init__(
        self,
        shards: list[str],
        read_texts: Callable[[str], list[str]],
        tokenizer,
        block_length: int,
        *,
        special_ids: LookupTokenIds | None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        tokenize_batch: int = 256,
    ):
        if not shards:
            raise UserInputError("no training shards given; pass annotated shard files")
        if block_length < 2:
            raise UserInputError(f"block length {block_length}: must be at least 2 tokens")
        self.shards, self.read_texts, self.tokenizer = list(shards), read_texts, tokenizer
        self.block_length, self.special_ids = block_length, special_ids
        self.seed, self.rank, self.world_size, self.tokenize_batch = seed, rank, world_size, tokenize_batch
        self.eos = tokenizer.eos_token_id
        self.epoch, self.shard_pos, self.row_pos = 0, 0, 0
        self._carry = np.zeros(0, np.int64), np.zeros(0, bool)  # tokens read but not yet consumed
        self._rows: list[str] | None = None  # this rank's texts of the current shard, in epoch order
        self._pending: deque[tuple[np.ndarray, np.ndarray]] = deque()  # tokenized rows not yet in the carry
        self._docs_this_epoch = 0

    def state_dict(self) -> dict:
        ids, mask = self._carry
        return {
            "epoch": self.epoch, "shard_pos": self.shard_pos, "row_pos": self.row_pos,
            "carry_ids": torch.from_numpy(ids.copy()), "carry_mask": torch.from_numpy(mask.copy()),
            "docs_this_epoch": self._docs_this_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.shard_pos, self.row_pos = state["epoch"], state["shard_pos"], state["row_pos"]
        self._carry = state["carry_ids"].numpy().astype(np.int64), state["carry_mask"].numpy().astype(bool)
        self._docs_this_epoch = state["docs_this_epoch"]
        self._rows, self._pending = None, deque()  # re-read and re-tokenized from the saved row on demand

    def _shard_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))

    def _load_rows(self) -> None:
        shard_index = int(self._shard_order()[self.shard_pos])
        texts = self.read_texts(self.shards[shard_index])
        order = np.random.default_rng([self.seed, self.epoch, shard_index]).permutation(len(texts))
        self._rows = [texts[i] for i in order[self.rank::self.world_size]]

    def _next_document(self) -> tuple[np.ndarray, np.ndarray]:
        while True:
            if self._rows is None:
                self._load_rows()
            if self.row_pos < len(self._rows):
                break
            self.shard_pos, self.row_pos, self._rows, self._pending = self.shard_pos + 1, 0, None, deque()
            if self.shard_pos == len(self.shards):
                if self._docs_this_epoch == 0:
                    raise UserInputError(
                        f"training shards hold no documents for process {self.rank} of {self.world_size}; "
                        "check the shards (and holdout_fraction) or use fewer processes"
                    )
                self.epoch, self.shard_pos, self._docs_this_epoch = self.epoch + 1, 0, 0
        if not self._pending:
            texts = self._rows[self.row_pos:self.row_pos + self.tokenize_batch]
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                doc = torch.tensor([*ids, self.eos], dtype=torch.long)
                self._pending.append((doc.numpy(), loss_mask(doc, self.special_ids).numpy()))
        self.row_pos += 1
        self._docs_this_epoch += 1
        return self._pending.popleft()

    def next_block(self) -> tuple[np.ndarray, np.ndarray]:
        T = self.block_length
        ids, mask = self._carry
        parts_ids, parts_mask, n = [ids], [mask], len(ids)
        while n < T:
            d_ids, d_mask = self._next_document()
            parts_ids.append(d_ids), parts_mask.append(d_mask)
            n += len(d_ids)
        ids, mask = np.concatenate(parts_ids), np.concatenate(parts_mask)
        self._carry = ids[T - 1:], mask[T - 1:]  # the block's last token starts the next block
        return ids[:T], mask[:T]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, mask), both (batch_size, block_length)."""
        blocks = [self.next_block() for _ in range(batch_size)]
        return torch.from_numpy(np.stack([b[0] for b in blocks])), torch.from_numpy(np.stack([b[1] for b in blocks]))


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    steps: int
    tokens: int  # training tokens consumed, all processes (steps x tokens per step)
    tokens_per_s: float  # over this session's optimizer steps, evaluation and checkpoints excluded
    train_seconds: float  # this session's
    checkpoint: str  # the newest checkpoint folder
    world_size: int
    history: list[dict] = field(default_factory=list)  # {"step","tokens","loss","lr"} and {"step","tokens","holdout_loss"}


def train(
    model,
    tokenizer,
    data: PackedBlocks,
    cfg: PretrainConfig,
    out_dir: str,
    *,
    runtime: DistributedRuntime,
    resume_from: str | None = None,
    evaluate: Callable[[object, torch.dtype | None], float] | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] = logger.info,
) -> TrainResult:
    """Train ``model`` (already on ``runtime.device``, weights from ``resume_from`` when resuming) on
    ``data`` for ``cfg``'s token budget; checkpoints under ``out_dir``. ``evaluate(model, dtype)``
    returns a holdout loss; it runs on rank 0 every ``cfg.eval_every`` steps and at the end.
    ``stop_after`` ends this session (with a checkpoint) after that many steps in all, as a preempted
    job would; the schedule still aims at the whole budget, and a later call resumes."""
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be at least 1 step, got {stop_after}")
    rank, world, device = runtime
    B, T, accum = cfg.batch_size, data.block_length, cfg.grad_accum
    tokens_per_step = world * B * accum * T
    total_steps = cfg.steps_for(tokens_per_step)
    amp = autocast_dtype(cfg.bf16, device)
    optimizer = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def lr_of(s: int) -> float:
        return lr_at(s, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=total_steps, min_lr=cfg.min_lr)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_of(s) / cfg.lr)
    step, history, checkpoint = 0, [], None

    if resume_from is not None:
        state = load_trainer_state(resume_from)
        if state["world_size"] != world:
            raise UserInputError(
                f"checkpoint {resume_from} was written by {state['world_size']} process(es), this run has {world}; "
                "resume with the same number of processes or use a new output folder"
            )
        restore(state, optimizer, scheduler=scheduler, data=data, rank=rank)
        step, history, checkpoint = state["step"], state["history"], resume_from
        log(f"resumed from {resume_from} at step {step}/{total_steps}")
    else:
        torch.manual_seed(cfg.seed + rank)  # per-process RNG streams (dropout); data order is seeded separately

    train_model = model
    if cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda"):
        train_model = torch.compile(model)
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    amp_context = autocast(device, amp)
    start_step, train_seconds = step, 0.0
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss tensor): read back only at log points

    def finish_logging() -> None:
        for s, loss in pending:
            history.append({"step": s, "tokens": s * tokens_per_step, "loss": float(loss), "lr": lr_of(s - 1)})
        pending.clear()

    def checkpoint_now() -> str:
        finish_logging()
        state = resumable_state(optimizer, scheduler=scheduler, data=data, world=world, step=step,
                                tokens=step * tokens_per_step, history=history, world_size=world,
                                config=cfg.model_dump(mode="json"))
        if rank == 0:
            save_checkpoint(model, tokenizer, state, out_dir, cfg.keep_checkpoints)
        if world > 1:
            dist.barrier()
        return checkpoint_path(out_dir, step)

    end_step = total_steps if stop_after is None else min(total_steps, stop_after)
    model.train()
    with cpu_bf16_attention(model, amp):  # the faster kernel for training too (models/kv_cache.py)
        while step < end_step:
            t0 = time.perf_counter()
            micro = [data.next_batch(B) for _ in range(accum)]
            n_targets = sum(m[:, 1:].sum() for _, m in micro).to(device, torch.float32)
            if world > 1:
                dist.all_reduce(n_targets)
            # DDP averages gradients over processes; scaling by world makes the sum token-weighted overall
            scale = world / n_targets.clamp(min=1)
            step_loss = torch.zeros((), device=device)
            for i, (ids, mask) in enumerate(micro):
                ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
                sync = world == 1 or i == accum - 1
                with (contextlib.nullcontext() if sync else train_model.no_sync()):
                    with amp_context:
                        logits = train_model(input_ids=ids).logits
                    nll, _ = masked_nll(logits, ids, mask)
                    (nll * scale).backward()
                step_loss += nll.detach()
            if world > 1:
                dist.all_reduce(step_loss)
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if rank == 0:
                progress.update(f"pretrain {os.path.basename(os.path.normpath(out_dir))}", step, end_step, "steps")
            pending.append((step, step_loss / n_targets.clamp(min=1)))
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_seconds += time.perf_counter() - t0

            if step % cfg.log_every == 0 or step == end_step:
                finish_logging()
                rate = (step - start_step) * tokens_per_step / max(train_seconds, 1e-9)
                log_step(log, step, total_steps, history[-1]["loss"], f"lr {history[-1]['lr']:.2e}",
                         f"{rate:,.0f} tok/s")
            if step % cfg.eval_every == 0 or step == total_steps:
                if rank == 0 and evaluate is not None:
                    holdout = evaluate(model, amp)
                    history.append({"step": step, "tokens": step * tokens_per_step, "holdout_loss": holdout})
                    log(f"step {step} holdout loss {holdout:.4f}")
                    model.train()
                if world > 1:
                    dist.barrier()
            if step % cfg.checkpoint_every == 0 or step == end_step:
                checkpoint = checkpoint_now()

    finish_logging()
    session_tokens = (step - start_step) * tokens_per_step
    return TrainResult(
        steps=step, tokens=step * tokens_per_step,
        tokens_per_s=session_tokens / train_seconds if train_seconds else 0.0,
        train_seconds=train_seconds, checkpoint=checkpoint, world_size=world, history=history,
    )


# ----------------------------------------------------------------------------- figures


# bf16 dense peak FLOP/s of common accelerators, for MFU (vendor datasheets, SXM parts)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    """The accelerator's bf16 dense peak FLOP/s, or None when unknown (CPUs included)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def model_flops_utilization(n_params: int, tokens_per_s: float, peak: float) -> float:
    """MFU by the 6·N rule (forward + backward FLOPs per token, attention FLOPs ignored), per device:
    pass the per-device tokens/s and one device's peak FLOP/s."""
    return 6.0 * n_params * tokens_per_s / peak


def plot_loss_curves(curves: dict[str, list[dict]], path: str, title: str = "pretraining loss") -> str:
    """A PNG of training loss (lines) and holdout loss (markers) against training tokens, one colour per
    run in ``curves`` (label -> TrainResult.history); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, history) in enumerate(curves.items()):
        colour = f"C{i}"
        train_pts = [(h["tokens"], h["loss"]) for h in history if "loss" in h]
        eval_pts = [(h["tokens"], h["holdout_loss"]) for h in history if "holdout_loss" in h]
        if train_pts:
            ax.plot(*zip(*train_pts), color=colour, lw=1.2, label=f"{label} train")
        if eval_pts:
            ax.plot(*zip(*eval_pts), "o--", color=colour, ms=4, lw=0.8, label=f"{label} holdout")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss per trained token (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
