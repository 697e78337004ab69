"""The LMLM flows: pretrain the LMLM and its standard baseline from annotated shards, evaluate both side
by side, and the CPU demo that chains corpus -> pretraining -> evaluation (their CLI commands are in
flows/lmlm_cli.py, which loads this module only when a command runs).

Outputs, under ``<workdir>/lmlm`` unless ``out_dir`` says otherwise::

    lmlm/<variant>/                    tasks.pretrain's folder: checkpoints, tokenizer, report.json, train.log
    lmlm/loss_curves.png               both variants' training and holdout loss against tokens
    lmlm/pretrain-report.json
    lmlm/evaluation-report.json        every figure of both variants, and the generated bios with their facts
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import publish_links, publish_png, publish_table
from flows.stages import pretrain_process, pretrain_variant
from schemas.errors import UserInputError
from schemas.lmlm_configs import LMLMEvaluationConfig, LMLMFlowConfig
from tasks.shardio import list_files


# ----------------------------------------------------------------------------- inputs


def workdir_report(workdir: str) -> dict:
    """The report.json `lmlm run` wrote in ``workdir`` ({} when there is none)."""
    path = os.path.join(workdir, "report.json")
    if not os.path.isfile(path):
        return {}
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc}); rerun `lmlm run --workdir {workdir}`") from None


def annotated_shards(config: LMLMFlowConfig) -> list[str]:
    """The annotated shards to train on: the config's, else the ones the workdir's corpus run wrote."""
    locations = list(config.annotated_shards)
    if not locations:
        folder = workdir_report(config.workdir).get("shards", {}).get("annotated")
        if not folder:
            raise UserInputError(f"workdir {config.workdir}: no report.json naming annotated shards; run "
                                 f"`lmlm run --workdir {config.workdir}` first, or pass annotated_shards")
        locations = [folder]
    shards = sorted({p for loc in locations for p in list_files(loc, (".parquet",))})
    if not shards:
        raise UserInputError(f"no annotated .parquet shards under {', '.join(locations)}; run `lmlm run` first "
                             "or fix annotated_shards")
    return shards


def out_dir_of(config: LMLMFlowConfig) -> str:
    return config.out_dir or os.path.join(config.workdir, "lmlm")


def warehouse_of(config: LMLMFlowConfig) -> str | None:
    path = workdir_report(config.workdir).get("warehouse") or os.path.join(config.workdir, "warehouse.duckdb")
    return path if os.path.isfile(path) else None


def ground_truth_of(config: LMLMFlowConfig) -> str | None:
    if config.evaluation.ground_truth:
        return config.evaluation.ground_truth
    path = os.path.join(config.workdir, "synthetic", "ground_truth")
    return path if os.path.isdir(path) else None


# ----------------------------------------------------------------------------- pretraining


@flow(name="lmlm-pretraining", task_runner=ThreadPoolTaskRunner(max_workers=2))
def lmlm_pretraining(config: LMLMFlowConfig = LMLMFlowConfig()) -> dict:
    """Pretrain the LMLM and the standard baseline (same shape, tokenizer and token budget) on the
    annotated shards of a corpus run; publishes both loss curves in one plot."""
    from models.pretrain import plot_loss_curves

    logger = get_run_logger()
    shards = annotated_shards(config)
    out = out_dir_of(config)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    variants = list(dict.fromkeys(config.variants))
    budget = f"{config.pretrain.max_steps} steps" if config.pretrain.max_steps else f"{config.pretrain.token_budget:,} tokens"
    logger.info("pretraining %s on %d shard(s): %s, %s each", " and ".join(variants), len(shards),
                config.pretrain.model, budget)
    if config.parallel and len(variants) > 1:
        cfg_json = config.pretrain.model_dump_json()
        futures = {v: pretrain_process.submit(cfg_json, shards, os.path.join(out, v), v, config.threads_per_process)
                   for v in variants}
        reports = {v: f.result() for v, f in futures.items()}
    else:
        reports = {v: pretrain_variant(config.pretrain, shards, os.path.join(out, v), v, config.threads_per_process)
                   for v in variants}
    wall = time.perf_counter() - t0
    curve = plot_loss_curves({v: r["history"] for v, r in reports.items()}, os.path.join(out, "loss_curves.png"),
                             title=f"LMLM vs standard, {config.pretrain.model}")
    publish_png(Path(curve).read_bytes(), key="lmlm-loss-curves", description="Training and holdout loss per variant")
    rows = [{"variant": v, "parameters": r["parameters"], "tokens": r["tokens"], "steps": r["steps"],
             "train_seconds": round(r["train_seconds"], 1), "tokens_per_s": round(r["tokens_per_s"]),
             "final_train_loss": r["final_train_loss"] and round(r["final_train_loss"], 4),
             "holdout_normalized_perplexity": r["holdout_normalized_perplexity"]
             and round(r["holdout_normalized_perplexity"], 3)} for v, r in reports.items()]
    publish_table(rows, key="lmlm-pretraining", description="Both variants: same parameters and token budget")
    report = {"out_dir": os.path.abspath(out), "shards": shards, "wall_seconds": wall, "loss_curves": curve,
              "variants": {v: {k: x for k, x in r.items() if k != "history"} for v, r in reports.items()}}
    Path(out, "pretrain-report.json").write_text(json.dumps(report, indent=2, default=str))
    publish_links({v: os.path.dirname(r["checkpoint"]) for v, r in reports.items()}
                  | {"report": os.path.join(out, "pretrain-report.json")}, key="lmlm-pretraining-outputs")
    logger.info("pretraining done in %.0f s: %s", wall, "; ".join(
        f"{r['variant']} holdout normalized ppl {r['holdout_normalized_perplexity']}" for r in rows))
    return report


# ----------------------------------------------------------------------------- evaluation


def checkpoints_of(config: LMLMFlowConfig) -> dict[str, str]:
    from models.train import latest_checkpoint

    found = {}
    for v in dict.fromkeys(config.variants):
        path = config.evaluation.checkpoints.get(v) or latest_checkpoint(os.path.join(out_dir_of(config), v))
        if not path:
            raise UserInputError(f"no {v} checkpoint under {os.path.join(out_dir_of(config), v)}; run "
                                 "`lmlm lmlm pretrain` first or set evaluation.checkpoints")
        found[v] = path
    return found


@flow(name="lmlm-evaluation")
def lmlm_evaluation(config: LMLMFlowConfig = LMLMFlowConfig()) -> dict:
    """Evaluate the LMLM and the standard baseline side by side: normalized perplexity (oracle and own
    lookups), FActScore of bios, cloze probes, edits and unlearning, and an LLM judge when configured."""
    import torch

    from flows.stages import evaluate_variant_task
    from tasks.evaluate_lmlm import cloze_probes, comparison_rows
    from tasks.ground_truth import load_ground_truth, sample_people
    from tasks.pretrain import holdout_texts, is_holdout

    logger = get_run_logger()
    ev: LMLMEvaluationConfig = config.evaluation
    torch.set_num_threads(config.threads_per_process)
    checkpoints = checkpoints_of(config)
    shards = annotated_shards(config)
    fraction = config.pretrain.holdout_fraction
    held = holdout_texts(shards, "annotated_text", fraction, ev.perplexity_docs)
    if not held:
        raise UserInputError(f"no held-out documents (pretrain.holdout_fraction {fraction}); raise it to score perplexity")
    warehouse = warehouse_of(config)
    lookup_source = ev.lookup_db or warehouse
    if lookup_source is None:
        raise UserInputError(f"workdir {config.workdir}: no warehouse.duckdb; set evaluation.lookup_db to a lookup "
                             "database (lmlm warehouse export-lookup-db)")
    gt_dir = ground_truth_of(config)
    gt = load_ground_truth(gt_dir) if gt_dir else None
    people = probes = edit_probes = []
    if gt is None:
        logger.warning("no synthetic ground truth: bios, cloze probes and edits are skipped")
    else:
        exclude = (lambda doc: False) if ev.include_holdout_people else (lambda doc: is_holdout(doc, fraction))
        pool = sample_people(gt, len(gt.people), ev.seed, exclude)
        people = pool[:ev.bio_people]
        probes = cloze_probes(gt, pool, ev.cloze_probes, ev.seed)
        edit_probes = cloze_probes(gt, pool, ev.edit_facts, ev.seed + 1)
    reports = {}
    for variant, checkpoint in checkpoints.items():
        reports[variant] = evaluate_variant_task(
            variant, checkpoint, holdout_annotated=held, lookup_source=lookup_source, lookup_mode=ev.lookup_mode,
            gt=gt, people=people, probes=probes, edit_probes=edit_probes, warehouse_path=warehouse, cfg=ev)
    rows = comparison_rows(reports)
    out = out_dir_of(config)
    os.makedirs(out, exist_ok=True)
    report = {"workdir": os.path.abspath(config.workdir), "checkpoints": checkpoints, "lookup_source": lookup_source,
              "lookup_mode": ev.lookup_mode, "ground_truth": gt_dir, "comparison": rows, "variants": reports}
    path = os.path.join(out, "evaluation-report.json")
    Path(path).write_text(json.dumps(report, indent=2, default=str))
    publish_table(rows, key="lmlm-comparison", description="LMLM vs standard baseline, side by side")
    _publish_samples(reports)
    publish_links({"report": path}, key="lmlm-evaluation-outputs")
    return {**report, "report": path}


def _publish_samples(reports: dict) -> None:
    from prefect.artifacts import create_markdown_artifact

    lines = ["# Sample bios", ""]
    for variant, r in reports.items():
        for sample in r.get("bio_samples", [])[:3]:
            ok = sum(f["supported"] for f in sample["facts"])
            lines += [f"**{variant}**, {sample['entity']} ({ok}/{len(sample['facts'])} facts supported)", "",
                      f"> {sample['prompt']}{sample['text_without_calls']}", ""]
    create_markdown_artifact("\n".join(lines), key="lmlm-bio-samples", description="Generated bios and their facts")


# ----------------------------------------------------------------------------- demo


@flow(name="lmlm-demo")
def lmlm_demo(config: LMLMFlowConfig = LMLMFlowConfig()) -> dict:
    """The whole LMLM job on this machine: the corpus run (when the workdir has none), pretraining of
    both variants, and their evaluation."""
    if not workdir_report(config.workdir) and not config.annotated_shards:
        from flows.corpus import corpus_processing
        from schemas.configs import CorpusFlowConfig

        corpus_processing(CorpusFlowConfig(workdir=config.workdir))
    pretraining = lmlm_pretraining(config)
    evaluation = lmlm_evaluation(config)
    return {"pretraining": pretraining, "evaluation": evaluation}
