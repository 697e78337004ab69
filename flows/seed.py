"""The seed-annotation flow: sample -> annotate -> correct -> validate -> seed shards (-> warehouse) -> report.

``seed_stage`` is the same stage inside the corpus-processing flow.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.artifacts import publish_links
from flows.stages import (
    annotate_seed_task,
    load_warehouse_task,
    reviewed_overrides_task,
    sample_seed_task,
    validate_annotations_task,
)
from schemas.configs import SeedAnnotationConfig, SeedFlowConfig, ValidationConfig
from schemas.reports import RunRecord, SeedStageReport, ValidationReport, WarehouseLoad
from tasks.seed import build_annotator
from tasks.shardio import list_files
from tasks.synthetic_world import RELATIONS
from tasks.validate import ValidationFailed


def publish_validation(report: ValidationReport, fail_flow: bool) -> None:
    """A validation report as a Prefect artifact; raises ValidationFailed when it failed and gating is on."""
    create_markdown_artifact(report.markdown(), key=f"validation-{report.suite}", description=f"GX suite {report.suite}")
    if not report.success:
        get_run_logger().error("validation suite %s failed", report.suite)
        if fail_flow:
            raise ValidationFailed(report)


def seed_stage(doc_shards: list[str], cfg: SeedAnnotationConfig, workdir: str, run_id: str,
               ground_truth: str | None, validation: ValidationConfig, warehouse_path: str,
               warehouse_wait_s: float = 0.0) -> SeedStageReport:
    """Sample, annotate, correct and validate; the seed shards go under ``<workdir>/seed``."""
    logger = get_run_logger()
    seed_dir = os.path.join(workdir, "seed")
    annotator = build_annotator(cfg.annotator, workdir, ground_truth)
    sample = sample_seed_task(doc_shards, cfg, annotator, seed_dir, run_id)
    reviewed = reviewed_overrides_task(warehouse_path, warehouse_wait_s)
    report = annotate_seed_task(annotator, sample, cfg, seed_dir, run_id, reviewed, ground_truth)
    logger.info("seed: %d documents, %d annotated, %d failed, %d rejected, %d calls%s", report.docs, report.annotated,
                report.failed, report.rejected, report.calls, " (finished earlier: skipped)" if report.skipped else "")
    if (q := report.quality_vs_gold) is not None:
        logger.info("seed vs gold: triplet P %.3f R %.3f F1 %.3f; span P %.3f R %.3f", q["precision"], q["recall"],
                    q["f1"], q["span_precision"], q["span_recall"])
    if validation.enabled:
        report.validation = validate_annotations_task([report.annotated_shard], [report.triplet_shard],
                                                      set(RELATIONS) if ground_truth else None,
                                                      validation.max_calls_per_100_words)
        publish_validation(report.validation, validation.fail_flow)
    _publish_seed_artifacts(report)
    return report


def _publish_seed_artifacts(report: SeedStageReport) -> None:
    rows = [{"step": step, **counts} for step, counts in report.corrector_counts.items()]
    if rows:
        create_table_artifact(rows, key="seed-corrector-steps", description="Calls changed/dropped per corrector step")
    lines = [f"# Seed annotation ({report.annotator.name} {report.annotator.version})", "",
             f"- documents {report.docs}, annotated {report.annotated}, failed {report.failed}, "
             f"rejected {report.rejected}, calls {report.calls}, repaired {report.repaired}"]
    if report.failure_reasons:
        lines += ["", "| failure | count |", "|---|---|", *[f"| {k} | {v} |" for k, v in report.failure_reasons.items()]]
    if (q := report.quality_vs_gold) is not None:
        lines += ["", "| vs gold | precision | recall | F1 |", "|---|---|---|---|",
                  f"| triplets | {q['precision']:.3f} | {q['recall']:.3f} | {q['f1']:.3f} |",
                  f"| spans | {q['span_precision']:.3f} | {q['span_recall']:.3f} | {q['span_f1']:.3f} |"]
    if (e := report.endpoint) is not None:
        lines += ["", f"- endpoint: {e.get('requests_sent')} requests, {e.get('prompt_tokens')} prompt + "
                      f"{e.get('completion_tokens')} completion tokens, ≈ ${e.get('estimated_cost_usd', 0):.4f}"]
    create_markdown_artifact("\n".join(lines), key="seed-annotation", description="Seed annotation report")


@flow(name="seed-annotation")
def seed_annotation(config: SeedFlowConfig) -> dict:
    """Annotate a stratified seed sample of existing document shards and load it into the warehouse."""
    run_id = str(flow_run.id or uuid.uuid4())
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    warehouse_path = config.warehouse_path or os.path.join(config.workdir, "warehouse.duckdb")
    doc_shards = sorted({p for loc in config.document_shards for p in list_files(loc, (".parquet",))})
    seed = seed_stage(doc_shards, config.seed, config.workdir, run_id, config.ground_truth, config.validation,
                      warehouse_path, config.warehouse_wait_s)
    loaded = load_warehouse_task(warehouse_path, WarehouseLoad(
        run=RunRecord(run_id=run_id, flow="seed-annotation", config=config.model_dump(), inputs=doc_shards),
        documents=doc_shards + [seed.sample_shard], annotated=[seed.annotated_shard], triplets=[seed.triplet_shard],
        relation_aliases=seed.relation_aliases, entity_aliases=seed.entity_aliases), config.warehouse_wait_s)
    report = {**seed.model_dump(mode="json", exclude={"relation_aliases", "entity_aliases"}),
              "warehouse_load": loaded.model_dump(), "run_id": run_id, "warehouse": os.path.abspath(warehouse_path)}
    report_path = Path(config.workdir, "seed-report.json")
    report_path.write_text(json.dumps(report, indent=2, default=str))
    publish_links({"warehouse": report["warehouse"], "annotated": os.path.dirname(seed.annotated_shard),
                   "triplets": os.path.dirname(seed.triplet_shard), "report": str(report_path)}, key="seed-outputs")
    return report
