"""The small-annotator flows: fine-tune on seed shards; annotate every document shard in bulk.

    seed shards -> fine-tune (held-out F1, training curve) -> checkpoint
    document shards -> bulk annotation (one task per shard, skipped when done) -> annotated + triplet shards

Both stages are also chained into the corpus-processing flow (``CorpusFlowConfig.small_annotator``).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import time
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from flows.artifacts import line_chart_png, publish_png, publish_table
from flows.runners import map_over_shards
from flows.stages import bulk_annotate_shard_task, finetune_annotator_task, load_warehouse_task, score_against_gold_task
from schemas.configs import AnnotatorFinetuneConfig, BulkAnnotationConfig, BulkFlowConfig, FinetuneFlowConfig, TaskRunnerConfig
from schemas.reports import BulkStageReport, FinetuneReport, RunRecord, ShardAnnotationReport, WarehouseLoad
from tasks.bulk import bulk_report, managed_server
from tasks.shardio import list_files


def finetune_stage(seed_shards: list[str], cfg: AnnotatorFinetuneConfig, workdir: str) -> FinetuneReport:
    """Fine-tune into ``<workdir>/annotator/model``; publishes the training curve and the held-out scores."""
    logger = get_run_logger()
    out_dir = os.path.join(workdir, "annotator")
    report: FinetuneReport = finetune_annotator_task(seed_shards, cfg, out_dir, log=logger.info)
    series = {"train": [(h["step"], h["loss"]) for h in report.history if "loss" in h],
              "held-out seed": [(h["step"], h["holdout_loss"]) for h in report.history if "holdout_loss" in h]}
    if series["train"]:
        report.curve_png = os.path.join(out_dir, "training_curve.png")
        publish_png(line_chart_png(series, f"annotator fine-tuning ({report.base}, {report.parameters:,} parameters)",
                                   "optimizer step", "loss per target token"),
                    key="annotator-training-curve", description="Annotator fine-tuning loss",
                    save_to=report.curve_png)
    q = report.holdout_quality
    lines = [f"# Annotator fine-tuning `{report.version}`", "",
             f"- base {report.base}, {report.parameters:,} parameters; {report.train_docs} training documents, "
             f"{report.holdout_docs} held out; {report.steps} steps ({report.epochs} epochs) in "
             f"{report.train_seconds} s{' (reused checkpoint)' if report.reused else ''}",
             f"- checkpoint `{report.checkpoint}`"]
    if q:
        lines += ["", "| held-out seed | precision | recall | F1 | source preserved |", "|---|---|---|---|---|",
                  f"| triplets | {q['precision']:.3f} | {q['recall']:.3f} | {q['f1']:.3f} | "
                  f"{q['source_preserved_rate']:.3f} |"]
    create_markdown_artifact("\n".join(lines), key="annotator-finetune", description="Annotator fine-tuning report")
    return report


def bulk_stage(doc_shards: list[str], cfg: BulkAnnotationConfig, checkpoint: str, workdir: str, run_id: str,
               ground_truth: str | None = None, exclude_from_scoring: list[str] = ()) -> BulkStageReport:
    """Annotate every document shard into ``<workdir>/bulk``; finished shards are skipped. With a ground
    truth, scores the output on the documents not in ``exclude_from_scoring`` (the seed)."""
    logger = get_run_logger()
    out_dir = os.path.join(workdir, "bulk")
    cache_dir = os.path.join(workdir, "cache")
    progress = create_progress_artifact(0.0, key="bulk-annotation-progress",
                                        description=f"document shards annotated (of {len(doc_shards)})")

    def on_result(r: ShardAnnotationReport, done: int) -> None:
        update_progress_artifact(progress, 100.0 * done / len(doc_shards))
        logger.info("bulk: %s %s (%d docs, %d calls, %.1f s)", posixpath.basename(r.shard),
                    "skipped (done earlier)" if r.skipped else "annotated", r.docs, r.calls, r.seconds)

    started = time.perf_counter()
    runner = cfg.task_runner or TaskRunnerConfig(kind="threads", workers=cfg.shards_in_flight)
    with managed_server(cfg, log=logger.info) if cfg.backend == "vllm" else contextlib.nullcontext():
        shard_reports = map_over_shards(bulk_annotate_shard_task, doc_shards, runner, name="bulk-annotate-shards",
                                        on_result=on_result, cfg=cfg, checkpoint=checkpoint, out_dir=out_dir,
                                        run_id=run_id, cache_dir=cache_dir)
    report = bulk_report(shard_reports, cfg, checkpoint, time.perf_counter() - started, cache_dir)
    if ground_truth:
        report.quality_vs_gold = score_against_gold_task(report.annotated_shards, ground_truth,
                                                         list(exclude_from_scoring))
        q = report.quality_vs_gold
        if q["documents"]:
            logger.info("bulk vs gold on %d documents not in the seed: triplet P %.3f R %.3f F1 %.3f, source "
                        "preserved %.3f", q["documents"], q["precision"], q["recall"], q["f1"], q["source_preserved_rate"])
    _publish_bulk(report)
    return report


def _publish_bulk(report: BulkStageReport) -> None:
    publish_table(report.per_shard, key="bulk-annotation-shards", description="Bulk annotation per document shard")
    lines = [f"# Bulk annotation ({report.backend})", "",
             f"- {report.shards} shards ({report.shards_skipped} finished earlier, skipped), {report.docs} "
             f"documents, {report.annotated} annotated, {report.failed} failed, {report.repaired} repaired, "
             f"{report.calls} calls",
             f"- throughput: {report.docs_per_s} documents/s over the shards processed in this run"]
    if (q := report.quality_vs_gold) and q["documents"]:
        lines += ["", "| vs gold (documents not in the seed) | precision | recall | F1 | source preserved |",
                  "|---|---|---|---|---|",
                  f"| triplets | {q['precision']:.3f} | {q['recall']:.3f} | {q['f1']:.3f} | {q['source_preserved_rate']:.3f} |"]
    create_markdown_artifact("\n".join(lines), key="bulk-annotation", description="Bulk annotation report")


@flow(name="annotator-finetune")
def annotator_finetune(config: FinetuneFlowConfig) -> dict:
    """Fine-tune the small annotator on annotated seed shards; report held-out quality and the curve."""
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    shards = sorted({p for loc in config.seed_shards for p in list_files(loc, (".parquet",))})
    report = finetune_stage(shards, config.finetune, config.workdir).model_dump(mode="json", exclude={"history"})
    Path(config.workdir, "finetune-report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


@flow(name="bulk-annotation")
def bulk_annotation(config: BulkFlowConfig) -> dict:
    """Annotate every document shard with the fine-tuned annotator (resumable per shard), then load the
    warehouse."""
    from flows.preflight import check_bulk_gate, require

    require(check_bulk_gate(config))  # a run started from the UI is gated like one from the CLI
    run_id = str(flow_run.id or uuid.uuid4())
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    doc_shards = sorted({p for loc in config.document_shards for p in list_files(loc, (".parquet",))})
    checkpoint = config.bulk.checkpoint or os.path.join(config.workdir, "annotator", "model")
    bulk = bulk_stage(doc_shards, config.bulk, checkpoint, config.workdir, run_id, config.ground_truth,
                      config.exclude_from_scoring)
    report = bulk.model_dump(mode="json")
    if config.load_warehouse:
        warehouse_path = config.warehouse_path or os.path.join(config.workdir, "warehouse.duckdb")
        loaded = load_warehouse_task(warehouse_path, WarehouseLoad(
            run=RunRecord(run_id=run_id, flow="bulk-annotation", config=config.model_dump(), inputs=doc_shards),
            documents=doc_shards, annotated=bulk.annotated_shards, triplets=bulk.triplet_shards),
            config.warehouse_wait_s)
        report["warehouse_load"] = loaded.model_dump()
        report["warehouse"] = os.path.abspath(warehouse_path)
    report["run_id"] = run_id
    Path(config.workdir, "bulk-report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
