"""The seed-annotation flow: sample -> annotate -> correct -> validate -> seed shards (-> warehouse) -> report."""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.artifacts import publish_links
from schemas import markup
from schemas.configs import SeedAnnotationConfig, SeedFlowConfig, ValidationConfig
from tasks.annotate import annotate_shard_task
from tasks.evaluate_annotation import score_triplets, scored_calls
from tasks.load import load_warehouse_task, reviewed_overrides_task
from tasks.seed import build_annotator, write_imported_documents, write_seed_documents_task
from tasks.shardio import list_files, read_table
from tasks.synthetic_world import RELATIONS
from tasks.validate import ValidationFailed, validate_annotations_task


KB_CANONICAL = {"kb-align", "gold"}  # backends whose entity and relation names come from a knowledge base


def publish_validation(report, fail_flow: bool) -> None:
    """A validation report as a Prefect artifact; raises ValidationFailed when it failed and gating is on."""
    create_markdown_artifact(report.markdown(), key=f"validation-{report.suite}", description=f"GX suite {report.suite}")
    if not report.success:
        get_run_logger().error("validation suite %s failed", report.suite)
        if fail_flow:
            raise ValidationFailed(report)


def score_against_gold(annotated_shard: str, ground_truth_dir: str) -> dict:
    """Triplet and span precision/recall of an annotated shard against the synthetic gold annotations."""
    ours = read_table(annotated_shard, ["doc_id", "annotated_text"]).to_pylist()
    gold = {r["doc_id"]: r["annotated_text"] for r in
            read_table(posixpath.join(ground_truth_dir, "annotated.parquet"), ["doc_id", "annotated_text"]).to_pylist()}
    predicted, expected = [], []
    for r in ours:
        if r["doc_id"] in gold:
            predicted += scored_calls(r["doc_id"], markup.parse(r["annotated_text"]))
            expected += scored_calls(r["doc_id"], markup.parse(gold[r["doc_id"]]))
    return score_triplets(predicted, expected)


def run_seed_stage(doc_shards: list[str], cfg: SeedAnnotationConfig, workdir: str, run_id: str,
                   ground_truth: str | None, validation: ValidationConfig, warehouse_path: str,
                   warehouse_wait_s: float = 0.0) -> dict:
    """Sample, annotate, correct and validate; returns the stage report (shards under <workdir>/seed)."""
    logger = get_run_logger()
    seed_dir = os.path.join(workdir, "seed")
    annotator = build_annotator(cfg.annotator, workdir, ground_truth)
    if cfg.annotator.backend == "import":
        seed_docs = write_imported_documents(annotator, seed_dir, run_id)
    else:
        seed_docs = write_seed_documents_task(doc_shards, cfg.sample_docs, cfg.stratify_by, cfg.sample_seed, seed_dir)
    rel_overrides, ent_overrides = reviewed_overrides_task(warehouse_path, warehouse_wait_s)
    corrector = cfg.corrector
    if corrector is not None and cfg.annotator.backend in KB_CANONICAL:
        # the knowledge base is the vocabulary: its names are canonical already, and unifying them
        # would merge distinct entities that share a name prefix ("Deckerview", "Deckerview United")
        corrector = corrector.model_copy(update={"unify_relations": False, "unify_entities": False})
    shard = annotate_shard_task(annotator, seed_docs, seed_dir, run_id, corrector, rel_overrides, ent_overrides)
    logger.info("seed: %d documents, %d annotated, %d failed, %d rejected, %d calls%s", shard.docs, shard.annotated,
                shard.failed, shard.rejected, shard.calls, " (finished earlier: skipped)" if shard.skipped else "")
    report = {"annotator": {"backend": cfg.annotator.backend, "name": annotator.name, "version": annotator.version,
                            "prompt_id": annotator.prompt_id},
              "sample_shard": seed_docs, **shard.model_dump(exclude={"relation_aliases", "entity_aliases"})}
    if hasattr(annotator, "stats"):  # endpoint annotators: requests, retries, tokens, estimated cost
        report["endpoint"] = annotator.stats.model_dump()
    if ground_truth:
        report["quality_vs_gold"] = score_against_gold(shard.annotated_shard, ground_truth)
        q = report["quality_vs_gold"]
        logger.info("seed vs gold: triplet P %.3f R %.3f F1 %.3f; span P %.3f R %.3f", q["precision"], q["recall"],
                    q["f1"], q["span_precision"], q["span_recall"])
    if validation.enabled:
        v = validate_annotations_task([shard.annotated_shard], [shard.triplet_shard],
                                      set(RELATIONS) if ground_truth else None, validation.max_calls_per_100_words)
        report["validation"] = v.model_dump()
        publish_validation(v, validation.fail_flow)
    report["relation_aliases"], report["entity_aliases"] = shard.relation_aliases, shard.entity_aliases
    _publish_seed_artifacts(report)
    return report


def _publish_seed_artifacts(report: dict) -> None:
    rows = [{"step": step, **counts} for step, counts in report.get("corrector_counts", {}).items()]
    if rows:
        create_table_artifact(rows, key="seed-corrector-steps", description="Calls changed/dropped per corrector step")
    lines = [f"# Seed annotation ({report['annotator']['name']} {report['annotator']['version']})", "",
             f"- documents {report['docs']}, annotated {report['annotated']}, failed {report['failed']}, "
             f"rejected {report['rejected']}, calls {report['calls']}, repaired {report['repaired']}"]
    if report.get("failure_reasons"):
        lines += ["", "| failure | count |", "|---|---|", *[f"| {k} | {v} |" for k, v in report["failure_reasons"].items()]]
    if "quality_vs_gold" in report:
        q = report["quality_vs_gold"]
        lines += ["", "| vs gold | precision | recall | F1 |", "|---|---|---|---|",
                  f"| triplets | {q['precision']:.3f} | {q['recall']:.3f} | {q['f1']:.3f} |",
                  f"| spans | {q['span_precision']:.3f} | {q['span_recall']:.3f} | {q['span_f1']:.3f} |"]
    if "endpoint" in report:
        e = report["endpoint"]
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
    report = run_seed_stage(doc_shards, config.seed, config.workdir, run_id, config.ground_truth,
                            config.validation, warehouse_path, config.warehouse_wait_s)
    report["warehouse_load"] = load_warehouse_task(
        warehouse_path, run_id, doc_shards + [report["sample_shard"]], [report["annotated_shard"]],
        [report["triplet_shard"]], flow="seed-annotation", config=config.model_dump(), inputs=doc_shards,
        relation_aliases=report.pop("relation_aliases"), entity_aliases=report.pop("entity_aliases"),
        wait_s=config.warehouse_wait_s,
    )
    report["run_id"], report["warehouse"] = run_id, os.path.abspath(warehouse_path)
    report_path = Path(config.workdir, "seed-report.json")
    report_path.write_text(json.dumps(report, indent=2, default=str))
    publish_links({"warehouse": report["warehouse"], "annotated": os.path.dirname(report["annotated_shard"]),
                   "triplets": os.path.dirname(report["triplet_shard"]), "report": str(report_path)},
                  key="seed-outputs")
    return report
