"""The corpus-processing flow: corpus -> document shards -> seed annotation -> validation -> warehouse -> report."""

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

from flows.seed import publish_validation, run_seed_stage
from schemas.configs import CorpusFlowConfig, IngestConfig
from tasks.ingest import ingest_task
from tasks.load import code_version, load_warehouse_task
from tasks.shardio import list_files
from tasks.synthetic import generate_corpus_task
from tasks.validate import validate_documents_task, validate_warehouse_task


@contextmanager
def _stage(timings: dict, name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)


@flow(name="corpus-processing")
def corpus_processing(config: CorpusFlowConfig = CorpusFlowConfig()) -> dict:
    """Turn a corpus (or the synthetic default) into validated shards and a loaded DuckDB warehouse."""
    logger = get_run_logger()
    run_id = str(flow_run.id or uuid.uuid4())
    workdir = config.workdir
    Path(workdir).mkdir(parents=True, exist_ok=True)
    warehouse_path = config.warehouse_path or os.path.join(workdir, "warehouse.duckdb")
    timings: dict[str, float] = {}
    report: dict = {
        "run_id": run_id,
        "started_at": datetime.now(timezone.utc).isoformat(),
        "code_version": code_version(),
        "workdir": os.path.abspath(workdir),
        "warehouse": os.path.abspath(warehouse_path),
    }

    ground_truth = None
    with _stage(timings, "corpus"):
        if config.corpus:
            inputs = list(config.corpus)
        else:
            corpus = generate_corpus_task(config.synthetic, os.path.join(workdir, "synthetic"))
            inputs, ground_truth = corpus.corpus_files, corpus.ground_truth_dir
            report["synthetic"] = corpus.model_dump(exclude={"corpus_files"})
    logger.info("corpus: %d input location(s)", len(inputs))

    shards_dir = os.path.join(workdir, "shards")
    with _stage(timings, "ingest"):
        ingest = ingest_task(
            IngestConfig(inputs=inputs, output=shards_dir, shard_docs=config.ingest_shard_docs,
                         workers=config.ingest_workers),
            run_id,
        )
    report["ingest"] = ingest.model_dump()
    doc_shards = list_files(os.path.join(shards_dir, "documents"), (".parquet",))
    logger.info("ingest: %d read, %d written, %d duplicates, %d quarantined",
                ingest.docs_read, ingest.docs_written, ingest.duplicates, ingest.quarantined)

    validations = report.setdefault("validation", {})
    if config.validation.enabled:
        with _stage(timings, "validate_documents"):
            v = validate_documents_task(doc_shards)
        validations["documents"] = v.model_dump()
        publish_validation(v, config.validation.fail_flow)

    with _stage(timings, "seed_annotation"):
        seed = run_seed_stage(doc_shards, config.seed, workdir, run_id, ground_truth, config.validation,
                              warehouse_path)
    relation_aliases, entity_aliases = seed.pop("relation_aliases"), seed.pop("entity_aliases")
    validations["annotations"] = seed.pop("validation", None) or {"success": True, "skipped": True}
    report["seed_annotation"] = seed

    with _stage(timings, "warehouse_load"):
        loaded = load_warehouse_task(
            warehouse_path, run_id, doc_shards, [seed["annotated_shard"]], [seed["triplet_shard"]],
            flow="corpus-processing", config=config.model_dump(), inputs=inputs,
            relation_aliases=relation_aliases, entity_aliases=entity_aliases,
        )
    report["warehouse_load"] = loaded

    if config.validation.enabled:
        with _stage(timings, "validate_warehouse"):
            v = validate_warehouse_task(warehouse_path)
        validations["warehouse"] = v.model_dump()
        publish_validation(v, config.validation.fail_flow)

    report["timings_s"] = timings
    report["finished_at"] = datetime.now(timezone.utc).isoformat()
    report["shards"] = {"documents": os.path.join(shards_dir, "documents"),
                        "annotated": os.path.dirname(seed["annotated_shard"]),
                        "triplets": os.path.dirname(seed["triplet_shard"])}
    _publish_report(report, workdir)
    return report


def _publish_report(report: dict, workdir: str) -> None:
    """report.json beside the outputs, plus markdown and table artifacts in Prefect."""
    path = os.path.join(workdir, "report.json")
    Path(path).write_text(json.dumps(report, indent=2, default=str))
    ing, seed, wh = report["ingest"], report["seed_annotation"], report["warehouse_load"]
    quality = seed.get("quality_vs_gold")
    rows = [
        {"stage": "ingest", "in": ing["docs_read"], "out": ing["docs_written"],
         "dropped": f"{ing['duplicates']} duplicates, {ing['quarantined']} quarantined",
         "seconds": report["timings_s"].get("ingest")},
        {"stage": "seed_annotation", "in": seed["docs"], "out": seed["annotated"],
         "dropped": f"{seed['failed']} failed, {seed['rejected']} rejected by the corrector",
         "seconds": report["timings_s"].get("seed_annotation")},
        {"stage": "warehouse_load", "in": seed["calls"], "out": wh.get("facts"), "dropped": "",
         "seconds": report["timings_s"].get("warehouse_load")},
    ]
    create_table_artifact(rows, key="corpus-stage-counts", description="Per-stage counts and timings")
    quarantine = ing.get("quarantine_reasons") or {}
    md = [
        f"# Corpus processing `{report['run_id']}`",
        "",
        f"- warehouse: `{report['warehouse']}` ({wh.get('facts')} facts, {wh.get('triplets')} triplets)",
        f"- document shards: `{report['shards']['documents']}`",
        f"- annotated shards: `{report['shards']['annotated']}`",
        f"- report: `{os.path.abspath(path)}`",
        "",
        "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in report["timings_s"].items()],
        "",
        "| quarantine reason | count |", "|---|---|",
        *([f"| {k} | {v} |" for k, v in quarantine.items()] or ["| (none) | 0 |"]),
        "",
        *([f"- seed annotation vs gold: triplet P {quality['precision']:.3f} R {quality['recall']:.3f}, "
            f"span P {quality['span_precision']:.3f} R {quality['span_recall']:.3f}", ""] if quality else []),
        "| validation suite | success |", "|---|---|",
        *[f"| {k} | {v['success']} |" for k, v in report.get("validation", {}).items()],
    ]
    create_markdown_artifact("\n".join(md), key="corpus-report", description="Corpus processing report")
