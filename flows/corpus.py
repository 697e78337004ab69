"""The corpus-processing flow: corpus -> document shards -> seed annotation -> correction -> [fine-tune ->
bulk annotation] -> validation -> warehouse -> report (the bracketed stages with ``small_annotator.enabled``)."""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Failed

from flows.annotator import bulk_stage, finetune_stage
from flows.artifacts import bar_chart_png, publish_links, publish_png, publish_table
from flows.preflight import check_corpus_run, require
from flows.runners import map_over_shards
from flows.seed import publish_validation, seed_stage
from flows.stages import (
    generate_corpus_task,
    ingest_task,
    load_warehouse_task,
    profile_document_shard_task,
    validate_annotations_task,
    validate_documents_task,
    validate_warehouse_task,
)
from schemas.configs import CorpusFlowConfig, IngestConfig
from schemas.reports import CorpusRunReport, RunRecord, SkippedValidation, WarehouseLoad
from tasks.finetune import quality_gate
from tasks.profile import merge_profiles
from tasks.shardio import list_files
from warehouse import db
from warehouse.db import code_version


BELOW_QUALITY_GATE = "Below quality gate"  # the name of a run's Failed state when the small annotator failed the gate


@contextmanager
def _stage(timings: dict, name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)


@flow(name="corpus-processing")
def corpus_processing(config: CorpusFlowConfig = CorpusFlowConfig()) -> dict:
    """Turn a corpus (or the synthetic default) into validated shards and a loaded DuckDB warehouse. A small
    annotator below ``small_annotator.min_f1`` (with ``below_min_f1: stop``) ends the run in a Failed state named
    ``Below quality gate`` whose message is the gate's decision, before bulk annotation and the warehouse."""
    require(check_corpus_run(config, busy_warehouse=False))  # a run started from the UI fails fast too
    logger = get_run_logger()
    workdir = config.workdir
    Path(workdir).mkdir(parents=True, exist_ok=True)
    warehouse_path = config.warehouse_path or os.path.join(workdir, "warehouse.duckdb")
    report = CorpusRunReport(run_id=str(flow_run.id or uuid.uuid4()), started_at=datetime.now(timezone.utc).isoformat(),
                             code_version=code_version(), workdir=os.path.abspath(workdir),
                             warehouse=os.path.abspath(warehouse_path))
    run_id, timings, validations = report.run_id, report.timings_s, report.validation

    ground_truth = None
    with _stage(timings, "corpus"):
        if config.corpus:
            inputs = list(config.corpus)
        else:
            corpus = generate_corpus_task(config.synthetic, os.path.join(workdir, "synthetic"))
            inputs, ground_truth = corpus.corpus_files, corpus.ground_truth_dir
            report.synthetic = corpus.model_dump(exclude={"corpus_files"})
    logger.info("corpus: %d input location(s)", len(inputs))

    shards_dir = os.path.join(workdir, "shards")
    with _stage(timings, "ingest"):
        report.ingest = ingest = ingest_task(
            IngestConfig(inputs=inputs, output=shards_dir, shard_docs=config.ingest_shard_docs,
                         workers=config.ingest_workers), run_id)
    doc_shards = list_files(os.path.join(shards_dir, "documents"), (".parquet",))
    logger.info("ingest: %d read, %d written, %d duplicates, %d quarantined",
                ingest.docs_read, ingest.docs_written, ingest.duplicates, ingest.quarantined)

    with _stage(timings, "profile"):  # the sharded stage: runs on the configured task runner (threads, Dask, Ray)
        profiles = map_over_shards(profile_document_shard_task, doc_shards, config.task_runner,
                                   name="profile-document-shards")
    report.profile = merge_profiles(profiles, config.task_runner.kind)

    if config.validation.enabled:
        with _stage(timings, "validate_documents"):
            validations["documents"] = validate_documents_task(doc_shards)
        publish_validation(validations["documents"], config.validation.fail_flow)

    small = config.small_annotator  # fine-tune + bulk stages: the seed is then a sample of the corpus
    seed_cfg = config.seed
    if small.enabled and seed_cfg.sample_docs is None:
        seed_cfg = seed_cfg.model_copy(update={"sample_docs": small.seed_docs})
    with _stage(timings, "seed_annotation"):
        report.seed_annotation = seed = seed_stage(doc_shards, seed_cfg, workdir, run_id, ground_truth,
                                                   config.validation, warehouse_path, config.warehouse_wait_s)
    validations["annotations"] = seed.validation or SkippedValidation()
    annotated_shards, triplet_shards = [seed.annotated_shard], [seed.triplet_shard]

    if small.enabled:
        with _stage(timings, "finetune"):
            report.finetune = finetune_stage([seed.annotated_shard], small.finetune, workdir)
        # a model below the bar never annotates the corpus: the run stops, or goes on with the seed only
        report.quality_gate = gate = quality_gate(report.finetune, small.min_f1, small.below_min_f1)
        logger.info(gate.decision)
        if not gate.passed and gate.action == "stop":  # the run fails with the gate's line, not a traceback
            report.finished_at = datetime.now(timezone.utc).isoformat()
            Path(workdir, "report.json").write_text(json.dumps(report.to_json_dict(), indent=2, default=str))
            return Failed(name=BELOW_QUALITY_GATE, message=gate.decision)
    if small.enabled and report.quality_gate.passed:
        bulk_cfg = small.bulk
        if bulk_cfg.corrector is None and config.seed.corrector is not None:
            # the seed's filters (density, entity in value, placement, ...) guard the small annotator's output
            # too; its names were learned from the corrected seed, so they are not unified again
            bulk_cfg = bulk_cfg.model_copy(update={"corrector": config.seed.corrector.model_copy(
                update={"unify_relations": False, "unify_entities": False})})
        with _stage(timings, "bulk_annotation"):
            report.bulk_annotation = bulk = bulk_stage(
                doc_shards, bulk_cfg, small.bulk.checkpoint or report.finetune.checkpoint, workdir, run_id,
                ground_truth, exclude_from_scoring=[seed.annotated_shard])
        # the warehouse keeps both annotators' output (keyed by annotator and version): the strong annotator's
        # for the seed documents, the small one's for every document; the training shards are the bulk ones
        annotated_shards, triplet_shards = bulk.annotated_shards, bulk.triplet_shards
        if config.validation.enabled:
            with _stage(timings, "validate_bulk_annotations"):
                validations["bulk_annotations"] = validate_annotations_task(
                    annotated_shards, triplet_shards, None, config.validation.max_calls_per_100_words)
            publish_validation(validations["bulk_annotations"], config.validation.fail_flow)

    with _stage(timings, "warehouse_load"):
        bulk_ran = report.bulk_annotation is not None
        seed_shards = ([seed.annotated_shard], [seed.triplet_shard]) if bulk_ran else ([], [])
        report.warehouse_load = load_warehouse_task(warehouse_path, WarehouseLoad(
            run=RunRecord(run_id=run_id, flow="corpus-processing", config=config.model_dump(), inputs=inputs),
            documents=doc_shards, annotated=seed_shards[0] + annotated_shards, triplets=seed_shards[1] + triplet_shards,
            relation_aliases=seed.relation_aliases, entity_aliases=seed.entity_aliases), config.warehouse_wait_s)

    if config.validation.enabled:
        with _stage(timings, "validate_warehouse"):
            validations["warehouse"] = validate_warehouse_task(warehouse_path)
        publish_validation(validations["warehouse"], config.validation.fail_flow)

    report.relations = relation_histogram(warehouse_path, config.warehouse_wait_s)
    report.finished_at = datetime.now(timezone.utc).isoformat()
    report.shards = {"documents": os.path.abspath(os.path.join(shards_dir, "documents")),
                     "annotated": os.path.abspath(os.path.dirname(annotated_shards[0])),
                     "triplets": os.path.abspath(os.path.dirname(triplet_shards[0]))}
    return _publish_report(report, workdir)


def relation_histogram(warehouse_path: str, wait_s: float) -> dict[str, int]:
    """Triplets per canonical relation in the warehouse, most frequent first."""
    con = db.connect(warehouse_path, read_only=True, wait_s=wait_s)
    try:
        rows = con.execute("SELECT relation, n_triplets FROM relation_stats WHERE n_triplets > 0 "
                           "ORDER BY n_triplets DESC, relation").fetchall()
    finally:
        con.close()
    return dict(rows)


def _publish_report(report: CorpusRunReport, workdir: str) -> dict:
    """report.json beside the outputs, plus markdown and table artifacts in Prefect; returns the JSON report."""
    path = os.path.join(workdir, "report.json")
    data = report.to_json_dict()
    Path(path).write_text(json.dumps(data, indent=2, default=str))
    ing, seed, wh, ft, bulk = (report.ingest, report.seed_annotation, report.warehouse_load, report.finetune,
                               report.bulk_annotation)
    timings, quality = report.timings_s, seed.quality_vs_gold
    rows = [
        {"stage": "ingest", "in": ing.docs_read, "out": ing.docs_written,
         "dropped": f"{ing.duplicates} duplicates, {ing.quarantined} quarantined", "seconds": timings.get("ingest")},
        {"stage": "seed_annotation", "in": seed.docs, "out": seed.annotated,
         "dropped": f"{seed.failed} failed, {seed.rejected} rejected by the corrector",
         "seconds": timings.get("seed_annotation")},
        *([{"stage": "finetune", "in": ft.train_docs, "out": ft.parameters,
            "dropped": f"held-out F1 {ft.holdout_quality.get('f1', float('nan')):.3f}", "seconds": timings.get("finetune")}]
          if ft is not None else []),
        *([{"stage": "bulk_annotation", "in": bulk.docs, "out": bulk.annotated, "dropped": f"{bulk.failed} failed",
            "seconds": timings.get("bulk_annotation")}] if bulk is not None else []),
        {"stage": "warehouse_load", "in": (bulk or seed).calls, "out": wh.facts, "dropped": "",
         "seconds": timings.get("warehouse_load")},
    ]
    create_table_artifact(rows, key="corpus-stage-counts", description="Per-stage counts and timings")
    quarantine = ing.quarantine_reasons
    md = [
        f"# Corpus processing `{report.run_id}`",
        "",
        f"- warehouse: `{report.warehouse}` ({wh.facts} facts, {wh.triplets} triplets)",
        f"- document shards: `{report.shards['documents']}`",
        f"- annotated shards: `{report.shards['annotated']}`",
        f"- report: `{os.path.abspath(path)}`",
        *([f"- {report.quality_gate.decision}"] if report.quality_gate else []),
        "",
        "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in timings.items()],
        "",
        "| quarantine reason | count |", "|---|---|",
        *([f"| {k} | {v} |" for k, v in quarantine.items()] or ["| (none) | 0 |"]),
        "",
        *([f"- seed annotation vs gold: triplet P {quality['precision']:.3f} R {quality['recall']:.3f}, "
            f"span P {quality['span_precision']:.3f} R {quality['span_recall']:.3f}", ""] if quality else []),
        "| validation suite | success |", "|---|---|",
        *[f"| {k} | {v.success} |" for k, v in report.validation.items()],
    ]
    create_markdown_artifact("\n".join(md), key="corpus-report", description="Corpus processing report")
    publish_table([{"reason": k, "documents": v} for k, v in quarantine.items()], key="corpus-quarantine-reasons",
                  description="Documents quarantined at ingestion, by reason (raw bytes in quarantine/*.parquet)")
    prof = report.profile
    publish_table([p.model_dump(include={"shard", "documents", "words", "characters", "worker"}) for p in prof.per_shard],
                  key="corpus-document-shards",
                  description=f"Document shards profiled on the {prof.task_runner} task runner")
    if report.relations:
        publish_table([{"relation": r, "triplets": n} for r, n in report.relations.items()],
                      key="corpus-relations", description="Triplets per canonical relation in the warehouse")
        publish_png(bar_chart_png(report.relations, "Triplets per relation (warehouse)", "triplets"),
                    key="corpus-relation-histogram", description="Triplets per canonical relation",
                    save_to=os.path.join(workdir, "plots", "relations.png"))
    if prof.categories:
        publish_png(bar_chart_png(prof.categories, "Documents per category", "documents"),
                    key="corpus-categories", description="Ingested documents per category",
                    save_to=os.path.join(workdir, "plots", "categories.png"))
    publish_links({"warehouse": report.warehouse, **report.shards, "report": path}, key="corpus-outputs")
    return data
