"""Pretrain an LMLM, or its standard baseline, from annotated shards.

The two variants read the same documents of the same ANNOTATED_SCHEMA shards: ``lmlm`` trains on
``annotated_text`` (lookup calls inline, values masked out of the loss), ``standard`` on ``text``
(the same text with every call stripped). With one PretrainConfig they share model shape, tokenizer
(trained on the call-free text of the training documents) and token budget (steps x block tokens).

Output folder::

    out_dir/tokenizer/                 the trained tokenizer (Hugging Face format), unless one was given
    out_dir/checkpoint-<step>/         save_pretrained model + tokenizer + trainer_state.pt (resumable)
    out_dir/loss_curve.png             training and holdout loss against tokens
    out_dir/report.json                the PretrainReport

More processes: ``torchrun --nproc_per_node G -m tasks.pretrain --variant lmlm --out OUT SHARD...``
(one process per GPU, nccl; on CPUs gloo), or ``accelerate launch --num_processes G -m tasks.pretrain ...``
(it sets the same WORLD_SIZE/RANK/LOCAL_RANK variables). The token budget stays the same, so the
number of steps shrinks G-fold; a checkpoint resumes only with the number of processes that wrote it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from models.lmlm import MODEL_SHAPES, build_model, context_length_of, count_parameters, flop_parameters, normalized_perplexity
from models.pretrain import PackedBlocks, model_flops_utilization, peak_flops, plot_loss_curves, train
from models.tokenizer import load_tokenizer, lookup_token_ids, train_tokenizer
from models.train import (
    autocast_dtype,
    latest_checkpoint,
    load_trainer_state,
    quiet_progress,
    setup_distributed,
)
from schemas.configs import PretrainConfig
from schemas.errors import UserInputError, report_to_launcher
from schemas.reports import PretrainReport
from schemas.shards import ANNOTATED_SCHEMA
from tasks.shardio import fs_and_path, read_table

logger = logging.getLogger(f"lmlm.{__name__}")  # flows/ attach the lmlm logger to Prefect's run log

Variant = Literal["lmlm", "standard"]
TEXT_COLUMN = {"lmlm": "annotated_text", "standard": "text"}
# settings a resumed run must share with the run that wrote the checkpoint
_RESUME_KEYS = ("model", "tokenizer", "vocab_size", "context_length", "batch_size", "grad_accum", "seed")


def is_holdout(doc_id: str, fraction: float) -> bool:
    """Whether a document is held out: a hash of its id, so every variant and rerun agrees."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2**64


def count_documents(shards: list[str], column: str, fraction: float) -> tuple[int, int]:
    """(training, held-out) documents of ``shards``; one clear error for a missing shard or column."""
    n_train = n_holdout = 0
    for shard in shards:
        fs, path = fs_and_path(shard)
        try:
            with fs.open(path, "rb") as f:
                names = pq.read_schema(f).names
        except (FileNotFoundError, OSError, pa.ArrowInvalid) as exc:
            raise UserInputError(f"annotated shard {shard}: cannot read it ({exc}); pass existing Parquet shards") from exc
        missing = [c for c in dict.fromkeys(("doc_id", "text", column)) if c not in names]
        if missing:
            raise UserInputError(
                f"annotated shard {shard}: no {'/'.join(missing)} column; pass shards of ANNOTATED_SCHEMA "
                f"({', '.join(ANNOTATED_SCHEMA.names)})"
            )
        ids = read_table(shard, columns=["doc_id"])["doc_id"].to_pylist()
        held = sum(is_holdout(d, fraction) for d in ids)
        n_train, n_holdout = n_train + len(ids) - held, n_holdout + held
    return n_train, n_holdout


def split_texts(shard: str, column: str, fraction: float) -> tuple[list[str], list[tuple[str, str]]]:
    """(training texts, [(doc_id, text) held out]) of one shard, in shard order."""
    table = read_table(shard, columns=["doc_id", column])
    train_texts, held = [], []
    for doc_id, text in zip(table["doc_id"].to_pylist(), table[column].to_pylist()):
        if is_holdout(doc_id, fraction):
            held.append((doc_id, text))
        else:
            train_texts.append(text)
    return train_texts, held


def holdout_texts(shards: list[str], column: str, fraction: float, limit: int) -> list[str]:
    """Up to ``limit`` held-out documents, the same ones for every variant (smallest doc_id hash first)."""
    held = [pair for shard in shards for pair in split_texts(shard, column, fraction)[1]]
    held.sort(key=lambda p: hashlib.sha1(p[0].encode("utf-8")).digest())
    return [text for _, text in held[:limit]]


def pretrain(
    cfg: PretrainConfig, annotated_shards: list[str], out_dir: str, variant: Variant = "lmlm", *,
    stop_after: int | None = None,
) -> PretrainReport:
    """Train the ``variant`` model of ``cfg`` on the training documents of ``annotated_shards``,
    checkpointing into ``out_dir`` (resuming exactly from its newest checkpoint when ``cfg.resume``);
    returns losses, throughput and the paths of the checkpoint, tokenizer and loss curve.
    ``stop_after`` ends this call after that many steps in all (time-sliced or preemptible jobs)."""
    import torch
    from transformers import AutoModelForCausalLM

    wall0 = time.perf_counter()
    if variant not in TEXT_COLUMN:
        raise UserInputError(f"variant {variant!r}: use 'lmlm' or 'standard'")
    if not annotated_shards:
        raise UserInputError("no annotated shards given; run the corpus flow first or pass shard paths")
    column = TEXT_COLUMN[variant]
    n_train, n_holdout = count_documents(annotated_shards, column, cfg.holdout_fraction)
    if n_train == 0:
        raise UserInputError(f"no training documents in {len(annotated_shards)} shard(s) (holdout_fraction {cfg.holdout_fraction})")
    runtime = setup_distributed()
    rank, world, device = runtime
    os.makedirs(out_dir, exist_ok=True)

    resume_from = latest_checkpoint(out_dir)
    if resume_from is not None and not cfg.resume:
        raise UserInputError(
            f"{out_dir} holds checkpoints of an earlier run; set resume true to continue it, or use an empty folder"
        )
    if resume_from is not None:
        saved = load_trainer_state(resume_from)["config"]
        changed = [k for k in _RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
        if changed:
            raise UserInputError(
                f"{resume_from}: written with other {', '.join(changed)} ({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); "
                "use those settings to resume, or an empty output folder"
            )

    # tokenizer: the checkpoint's when resuming; else the given one (a hub model's own by default);
    # else trained by rank 0 on the call-free text of the training documents
    given = cfg.tokenizer or (cfg.model if cfg.model not in MODEL_SHAPES else None)
    if resume_from is not None:
        tokenizer, tokenizer_path = load_tokenizer(resume_from), resume_from
    elif given is not None:
        try:
            tokenizer, tokenizer_path = load_tokenizer(given), given
        except UserInputError as exc:
            if cfg.tokenizer is not None:
                raise
            raise UserInputError(
                f"model {cfg.model!r}: not a known shape ({', '.join(MODEL_SHAPES)}) nor a loadable hub name or folder"
            ) from exc
    else:
        tokenizer_path = os.path.join(out_dir, "tokenizer")
        if rank == 0:
            source = (t for shard in annotated_shards for t in split_texts(shard, "text", cfg.holdout_fraction)[0])
            train_tokenizer(source, cfg.vocab_size, tokenizer_path)
        _barrier(world)
        tokenizer = load_tokenizer(tokenizer_path)
    special_ids = lookup_token_ids(tokenizer) if variant == "lmlm" else None

    if resume_from is not None:
        with quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(resume_from)
    else:
        torch.manual_seed(cfg.seed)  # same seed, same initial weights, for both variants
        model = build_model(cfg.model, len(tokenizer), context_length=cfg.context_length, eos_token_id=tokenizer.eos_token_id)
    model.to(device)
    T = cfg.context_length or context_length_of(model)
    if T > context_length_of(model):
        raise UserInputError(f"context_length {T}: model {cfg.model} supports at most {context_length_of(model)}")

    def read_training_texts(shard: str) -> list[str]:
        return split_texts(shard, column, cfg.holdout_fraction)[0]

    data = PackedBlocks(
        annotated_shards, read_training_texts, tokenizer, T, special_ids=special_ids,
        seed=cfg.seed, rank=rank, world_size=world,
    )
    held = holdout_texts(annotated_shards, column, cfg.holdout_fraction, cfg.eval_docs) if rank == 0 else []
    last_eval = {}

    def evaluate(m, amp) -> float:
        ppl = normalized_perplexity(m, tokenizer, held, lookup_calls=variant == "lmlm", context_length=T, autocast_dtype=amp)
        last_eval["ppl"] = ppl
        return ppl.loss

    logger.info(
        f"pretraining {variant} {cfg.model}: {count_parameters(model):,} parameters, vocab {len(tokenizer)}, "
        f"block {T}, {world} process(es) on {device.type}; {n_train} training docs, {n_holdout} held out "
        f"({len(held)} scored)"
    )
    result = train(
        model, tokenizer, data, cfg, out_dir, runtime=runtime, resume_from=resume_from,
        evaluate=evaluate if held else None, stop_after=stop_after, log=logger.info,
    )
    scored_at = [h["step"] for h in result.history if "holdout_loss" in h]
    if rank == 0 and held and (not scored_at or scored_at[-1] != result.steps or "ppl" not in last_eval):
        evaluate(model, autocast_dtype(cfg.bf16, device))  # stopped early, or resumed after the end: score now
    ppl = last_eval.get("ppl")
    losses = [h["loss"] for h in result.history if "loss" in h]
    tail = losses[-max(1, len(losses) // 20):]
    peak = peak_flops(device)
    report = PretrainReport(
        variant=variant, model=cfg.model, parameters=count_parameters(model), vocab_size=len(tokenizer),
        context_length=T, world_size=world, steps=result.steps, tokens=result.tokens,
        tokens_per_s=result.tokens_per_s, train_seconds=result.train_seconds,
        wall_seconds=time.perf_counter() - wall0, train_docs=n_train, holdout_docs=len(held),
        final_train_loss=sum(tail) / len(tail) if tail else None,
        holdout_loss=ppl.loss if ppl else None, holdout_normalized_perplexity=ppl.normalized if ppl else None,
        mfu=model_flops_utilization(flop_parameters(model), result.tokens_per_s / world, peak) if peak else None,
        checkpoint=result.checkpoint, tokenizer=tokenizer_path,
        loss_curve=os.path.join(out_dir, "loss_curve.png"), history=result.history,
    )
    if rank == 0:
        plot_loss_curves({variant: result.history}, report.loss_curve, title=f"{variant} {cfg.model}")
        with open(os.path.join(out_dir, "report.json"), "w") as f:
            f.write(report.model_dump_json(indent=1))
    return report


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()



def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.pretrain`` / ``torchrun ... -m tasks.pretrain``: one pretraining run."""
    p = argparse.ArgumentParser(prog="python -m tasks.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", nargs="+", help="annotated Parquet shards")
    p.add_argument("--out", required=True, help="output folder (checkpoints, tokenizer, loss curve, report)")
    p.add_argument("--variant", choices=sorted(TEXT_COLUMN), default="lmlm")
    p.add_argument("--config", help="JSON file of PretrainConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="override one config field")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)  # over Prefect's console handler
    try:
        fields = json.load(open(args.config)) if args.config else {}
        for item in args.set:
            key, _, value = item.partition("=")
            try:
                fields[key] = json.loads(value)
            except json.JSONDecodeError:
                fields[key] = value
        cfg = PretrainConfig(**fields)
    except (OSError, json.JSONDecodeError) as exc:
        return _user_error(f"config file {args.config}: {exc}; pass a JSON object of PretrainConfig fields")
    except ValidationError as exc:
        bad = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        return _user_error(f"config: {bad}")
    try:
        report = pretrain(cfg, args.shards, args.out, args.variant)
    except UserInputError as exc:
        return _user_error(str(exc))
    if int(os.environ.get("RANK", "0")) == 0:
        print(report.model_dump_json(exclude={"history"}, indent=1))
    return 0


def _user_error(message: str) -> int:
    print(f"pretrain: error: {message}", file=sys.stderr)
    report_to_launcher(message)
    return 2


if __name__ == "__main__":
    sys.exit(main())
