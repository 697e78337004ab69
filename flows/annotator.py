"""The small-annotator flows: fine-tune on seed shards; annotate every document shard in bulk.

    seed shards -> fine-tune (held-out F1, training curve) -> checkpoint
    document shards -> bulk annotation (one task per shard, skipped when done) -> annotated + triplet shards

Both stages are also chained into the corpus-processing flow (``CorpusFlowConfig.small_annotator``).
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows.artifacts import line_chart_png, publish_png, publish_table
from schemas import markup
from schemas.configs import (
    AnnotatorFinetuneConfig,
    BulkAnnotationConfig,
    BulkFlowConfig,
    FinetuneFlowConfig,
    TaskRunnerConfig,
)
from tasks.annotate import ShardAnnotationReport
from tasks.bulk import build_bulk_annotator, bulk_annotate_shard_task, managed_server
from tasks.evaluate_annotation import score_triplets, scored_calls
from tasks.finetune import finetune_annotator_task
from tasks.shardio import list_files, read_table


def run_finetune_stage(seed_shards: list[str], cfg: AnnotatorFinetuneConfig, workdir: str) -> dict:
    """Fine-tune into ``<workdir>/annotator/model``; publishes the training curve and the held-out scores."""
    logger = get_run_logger()
    out_dir = os.path.join(workdir, "annotator")
    report = finetune_annotator_task(seed_shards, cfg, out_dir, log=logger.info).model_dump()
    history = report.pop("history")
    series = {"train": [(h["step"], h["loss"]) for h in history if "loss" in h],
              "held-out seed": [(h["step"], h["holdout_loss"]) for h in history if "holdout_loss" in h]}
    if series["train"]:
        report["curve_png"] = os.path.join(out_dir, "training_curve.png")
        publish_png(line_chart_png(series, f"annotator fine-tuning ({cfg.base}, {report['parameters']:,} parameters)",
                                   "optimizer step", "loss per target token"),
                    key="annotator-training-curve", description="Annotator fine-tuning loss",
                    save_to=report["curve_png"])
    q = report["holdout_quality"]
    lines = [f"# Annotator fine-tuning `{report['version']}`", "",
             f"- base {cfg.base}, {report['parameters']:,} parameters; {report['train_docs']} training documents, "
             f"{report['holdout_docs']} held out; {report['steps']} steps ({report['epochs']} epochs) in "
             f"{report['train_seconds']} s{' (reused checkpoint)' if report['reused'] else ''}",
             f"- checkpoint `{report['checkpoint']}`"]
    if q:
        lines += ["", "| held-out seed | precision | recall | F1 | source preserved |", "|---|---|---|---|---|",
                  f"| triplets | {q['precision']:.3f} | {q['recall']:.3f} | {q['f1']:.3f} | "
                  f"{q['source_preserved_rate']:.3f} |"]
    create_markdown_artifact("\n".join(lines), key="annotator-finetune", description="Annotator fine-tuning report")
    return report


def _task_runner(cfg: BulkAnnotationConfig):
    from flows.runners import build_task_runner

    return build_task_runner(cfg.task_runner or TaskRunnerConfig(kind="threads", workers=cfg.shards_in_flight))


def run_bulk_stage(doc_shards: list[str], cfg: BulkAnnotationConfig, checkpoint: str, workdir: str, run_id: str,
                   ground_truth: str | None = None, exclude_from_scoring: list[str] = ()) -> dict:
    """Annotate every document shard into ``<workdir>/bulk``; finished shards are skipped. Returns the
    stage report: per-shard counts, documents/s, and (with a ground truth) quality on unseen documents."""
    logger = get_run_logger()
    out_dir = os.path.join(workdir, "bulk")
    cache_dir = os.path.join(workdir, "cache")
    progress = create_progress_artifact(0.0, key="bulk-annotation-progress",
                                        description=f"document shards annotated (of {len(doc_shards)})")
    started = time.perf_counter()
    reports: list[ShardAnnotationReport] = []
    with managed_server(cfg, log=logger.info) if cfg.backend == "vllm" else _nothing():

        @flow(name="bulk-annotate-shards", task_runner=_task_runner(cfg), validate_parameters=False)
        def shards_stage(shards: list[str]) -> list[ShardAnnotationReport]:
            futures = [bulk_annotate_shard_task.submit(s, cfg, checkpoint, out_dir, run_id, cache_dir) for s in shards]
            done = []
            for future in as_completed(futures):
                done.append(future.result())
                update_progress_artifact(progress, 100.0 * len(done) / len(shards))
                r = done[-1]
                logger.info("bulk: %s %s (%d docs, %d calls, %.1f s)", posixpath.basename(r.shard),
                            "skipped (done earlier)" if r.skipped else "annotated", r.docs, r.calls, r.seconds)
            return sorted(done, key=lambda r: r.shard)

        reports = shards_stage(list(doc_shards)) if doc_shards else []
    seconds = time.perf_counter() - started
    processed = [r for r in reports if not r.skipped]
    docs_processed = sum(r.docs for r in processed)
    report = {
        "backend": cfg.backend, "checkpoint": os.path.abspath(checkpoint), "shards": len(reports),
        "shards_processed": len(processed), "shards_skipped": len(reports) - len(processed),
        "docs": sum(r.docs for r in reports), "annotated": sum(r.annotated for r in reports),
        "failed": sum(r.failed for r in reports), "rejected": sum(r.rejected for r in reports),
        "repaired": sum(r.repaired for r in reports), "calls": sum(r.calls for r in reports),
        "seconds": round(seconds, 3),
        "docs_per_s": round(docs_processed / max(sum(r.seconds for r in processed), 1e-9), 3) if processed else None,
        "annotated_shards": [r.annotated_shard for r in reports], "triplet_shards": [r.triplet_shard for r in reports],
        "per_shard": [r.model_dump(include={"shard", "skipped", "docs", "annotated", "failed", "repaired", "calls",
                                            "seconds"}) for r in reports],
    }
    if processed and cfg.task_runner is None:  # the annotator of this process did the work (threads): its counters
        from dataclasses import asdict, is_dataclass

        stats = build_bulk_annotator(cfg, checkpoint, cache_dir).stats
        report["annotator_stats"] = asdict(stats) if is_dataclass(stats) else stats.model_dump()
    if ground_truth:
        report["quality_vs_gold"] = score_shards_against_gold(report["annotated_shards"], ground_truth,
                                                              exclude_from_scoring)
        q = report["quality_vs_gold"]
        if q["documents"]:
            logger.info("bulk vs gold on %d documents not in the seed: triplet P %.3f R %.3f F1 %.3f, source "
                        "preserved %.3f", q["documents"], q["precision"], q["recall"], q["f1"], q["source_preserved_rate"])
    publish_table(report["per_shard"], key="bulk-annotation-shards", description="Bulk annotation per document shard")
    lines = [f"# Bulk annotation ({cfg.backend})", "",
             f"- {report['shards']} shards ({report['shards_skipped']} finished earlier, skipped), {report['docs']} "
             f"documents, {report['annotated']} annotated, {report['failed']} failed, {report['repaired']} repaired, "
             f"{report['calls']} calls",
             f"- throughput: {report['docs_per_s']} documents/s over the shards processed in this run"]
    if report.get("quality_vs_gold", {}).get("documents"):
        q = report["quality_vs_gold"]
        lines += ["", "| vs gold (documents not in the seed) | precision | recall | F1 | source preserved |",
                  "|---|---|---|---|---|",
                  f"| triplets | {q['precision']:.3f} | {q['recall']:.3f} | {q['f1']:.3f} | {q['source_preserved_rate']:.3f} |"]
    create_markdown_artifact("\n".join(lines), key="bulk-annotation", description="Bulk annotation report")
    return report


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def score_shards_against_gold(annotated_shards: list[str], ground_truth_dir: str, exclude: list[str] = ()) -> dict:
    """Triplet P/R/F1 of annotated shards against the synthetic gold, over documents not in ``exclude``
    shards, and the share of outputs whose stripped text equals the source."""
    skip = {d for s in exclude for d in read_table(s, ["doc_id"]).column("doc_id").to_pylist()}
    gold = {r["doc_id"]: r["annotated_text"] for r in
            read_table(posixpath.join(ground_truth_dir, "annotated.parquet"), ["doc_id", "annotated_text"]).to_pylist()}
    predicted, expected, n, preserved = [], [], 0, 0
    for shard in annotated_shards:
        for r in read_table(shard, ["doc_id", "text", "annotated_text"]).to_pylist():
            if r["doc_id"] in skip or r["doc_id"] not in gold:
                continue
            n += 1
            preserved += markup.strip(r["annotated_text"]) == r["text"]
            predicted += scored_calls(r["doc_id"], markup.parse(r["annotated_text"]))
            expected += scored_calls(r["doc_id"], markup.parse(gold[r["doc_id"]]))
    return {**score_triplets(predicted, expected), "documents": n,
            "source_preserved_rate": preserved / n if n else None}


@flow(name="annotator-finetune")
def annotator_finetune(config: FinetuneFlowConfig) -> dict:
    """Fine-tune the small annotator on annotated seed shards; report held-out quality and the curve."""
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    shards = sorted({p for loc in config.seed_shards for p in list_files(loc, (".parquet",))})
    report = run_finetune_stage(shards, config.finetune, config.workdir)
    Path(config.workdir, "finetune-report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


@flow(name="bulk-annotation")
def bulk_annotation(config: BulkFlowConfig) -> dict:
    """Annotate every document shard with the fine-tuned annotator (resumable per shard), then load the
    warehouse."""
    from tasks.load import load_warehouse_task

    run_id = str(flow_run.id or uuid.uuid4())
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    doc_shards = sorted({p for loc in config.document_shards for p in list_files(loc, (".parquet",))})
    checkpoint = config.bulk.checkpoint or os.path.join(config.workdir, "annotator", "model")
    report = run_bulk_stage(doc_shards, config.bulk, checkpoint, config.workdir, run_id, config.ground_truth,
                            config.exclude_from_scoring)
    if config.load_warehouse:
        warehouse_path = config.warehouse_path or os.path.join(config.workdir, "warehouse.duckdb")
        report["warehouse_load"] = load_warehouse_task(
            warehouse_path, run_id, doc_shards, report["annotated_shards"], report["triplet_shards"],
            flow="bulk-annotation", config=config.model_dump(), inputs=doc_shards, wait_s=config.warehouse_wait_s)
        report["warehouse"] = os.path.abspath(warehouse_path)
    report["run_id"] = run_id
    Path(config.workdir, "bulk-report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
