"""Seed annotation: a stratified sample of documents, the configured initial annotator, the corrector.

Backends (``AnnotatorConfig.backend``): ``kb-align`` (offline distant supervision from a knowledge
base; the embedded default), ``openai`` (any OpenAI-compatible endpoint), ``gold`` (the synthetic
corpus's ground truth) and ``import`` (the reference's annotated JSON files).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import random
from collections import defaultdict

import pyarrow as pa

from schemas.configs import AnnotatorConfig, SeedAnnotationConfig
from schemas.documents import Annotation, Annotator, Document
from schemas.errors import UserInputError
from schemas.reports import AnnotatorInfo, SeedStageReport
from schemas.shards import DOCUMENT_SCHEMA, content_hash
from tasks.annotate import annotate_shard
from tasks.evaluate_annotation import score_against_gold
from tasks.shardio import fs_and_path, read_table, write_table_atomic

KB_CANONICAL = {"kb-align", "gold"}  # backends whose entity and relation names come from a knowledge base


class GoldAnnotator:
    """The synthetic corpus's gold annotations, looked up by document id (for tests and baselines)."""

    name = "gold"
    prompt_id = None

    def __init__(self, ground_truth_dir: str):
        table = read_table(posixpath.join(ground_truth_dir, "annotated.parquet"), ["doc_id", "text", "annotated_text", "annotator_version"])
        self.version = (table["annotator_version"][0].as_py() if table.num_rows else "empty")
        self.gold = {r["doc_id"]: (r["text"], r["annotated_text"]) for r in table.to_pylist()}

    def annotate(self, docs: list[Document]) -> list[Annotation]:
        out = []
        for doc in docs:
            gold = self.gold.get(doc.doc_id)
            if gold is None:
                out.append(Annotation(doc_id=doc.doc_id, error="no_ground_truth: not a synthetic-corpus document"))
            elif gold[0] != doc.text:
                out.append(Annotation(doc_id=doc.doc_id, error="text_mismatch: document differs from its ground truth"))
            else:
                out.append(Annotation(doc_id=doc.doc_id, annotated_text=gold[1]))
        return out


def build_annotator(cfg: AnnotatorConfig, workdir: str, ground_truth_dir: str | None = None):
    """The configured annotator; a missing input is one clear error naming the setting to fill in."""
    if cfg.backend == "kb-align":
        from tasks.annotate_kb import KBAlignAnnotator

        kb, aliases = cfg.kb, None
        if kb is None and ground_truth_dir:
            kb = posixpath.join(ground_truth_dir, "kb.parquet")
            aliases = posixpath.join(ground_truth_dir, "aliases.parquet")
        if kb is None:
            raise UserInputError("annotator.backend 'kb-align' needs a knowledge base: set annotator.kb to a "
                                 "Parquet/JSON file of (entity, relation, value)")
        return KBAlignAnnotator(kb, aliases)
    if cfg.backend == "openai":
        from tasks.annotate_openai import OpenAIAnnotator

        return OpenAIAnnotator(cfg, cfg.cache_dir or os.path.join(workdir, "cache"))
    if cfg.backend == "gold":
        if not ground_truth_dir:
            raise UserInputError("annotator.backend 'gold' needs the synthetic corpus's ground truth: leave "
                                 "`corpus` unset, or choose kb-align/openai")
        return GoldAnnotator(ground_truth_dir)
    if cfg.backend == "import":
        from tasks.annotate_kb import ImportedAnnotations

        if not cfg.import_path:
            raise UserInputError("annotator.backend 'import' needs annotator.import_path (a reference-format JSON file)")
        return ImportedAnnotations(cfg.import_path)
    raise UserInputError(f"annotator.backend {cfg.backend!r} is unknown: use kb-align, openai, gold or import")


def stratified_sample(rows: list[dict], n: int | None, by: str | None, seed: int) -> list[dict]:
    """``n`` rows with each stratum (value of ``by``) represented in proportion, at least once when possible.

    Deterministic for a seed; the order of the input does not matter.
    """
    rows = sorted(rows, key=lambda r: r["doc_id"])
    if n is None or n >= len(rows):
        return rows
    rng = random.Random(seed)
    strata: dict = defaultdict(list)
    for r in rows:
        strata[r.get(by) if by else None].append(r)
    keys = sorted(strata, key=lambda k: (k is None, str(k)))
    for k in keys:
        rng.shuffle(strata[k])
    quota = {k: max(1, round(n * len(strata[k]) / len(rows))) for k in keys}
    while sum(quota.values()) > n:  # rounding up small strata can overshoot: trim the largest
        quota[max(keys, key=lambda k: quota[k])] -= 1
    picked = [r for k in keys for r in strata[k][:quota[k]]]
    rest = [r for k in keys for r in strata[k][quota[k]:]]
    rng.shuffle(rest)
    picked += rest[: n - len(picked)]
    return sorted(picked, key=lambda r: r["doc_id"])


def write_seed_documents(doc_shards: list[str], n: int | None, by: str | None, seed: int, out_dir: str) -> str:
    """The seed sample as one document shard, named by its content (same sample, same name)."""
    tables = [read_table(s) for s in doc_shards]
    rows = [r for t in tables for r in t.to_pylist()]
    if not rows:
        raise UserInputError("no documents to sample for seed annotation: the document shards are empty")
    sample = stratified_sample(rows, n, by, seed)
    name = "seed-" + hashlib.sha1("\n".join(r["doc_id"] for r in sample).encode()).hexdigest()[:16] + ".parquet"
    path = posixpath.join(out_dir, "documents", name)
    write_table_atomic(pa.Table.from_pylist(sample, schema=DOCUMENT_SCHEMA), path)
    return path


def write_imported_documents(imported, out_dir: str, run_id: str) -> str:
    """The documents of an imported annotation file as a document shard."""
    rows = [{"doc_id": d.doc_id, "text": d.text, "content_hash": content_hash(d.text), "source": imported.name,
             "url": None, "category": None, "metadata": None, "source_file": imported.path, "source_line": i + 1,
             "run_id": run_id} for i, d in enumerate(imported.documents)]
    path = posixpath.join(out_dir, "documents", f"import-{imported.version.split('+')[-1]}.parquet")
    write_table_atomic(pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA), path)
    return path


def sample_seed_documents(doc_shards: list[str], cfg: SeedAnnotationConfig, annotator: Annotator, seed_dir: str,
                          run_id: str) -> str:
    """The seed's document shard: a stratified sample of ``doc_shards``, or the imported file's documents."""
    if cfg.annotator.backend == "import":
        return write_imported_documents(annotator, seed_dir, run_id)
    return write_seed_documents(doc_shards, cfg.sample_docs, cfg.stratify_by, cfg.sample_seed, seed_dir)


def annotate_seed(annotator: Annotator, sample_shard: str, cfg: SeedAnnotationConfig, seed_dir: str, run_id: str,
                  reviewed: tuple[dict[str, str], dict[str, str]] = ({}, {}),
                  ground_truth: str | None = None) -> SeedStageReport:
    """Annotate and correct the seed sample into ``seed_dir`` (skipped when done for the same input and
    annotator); ``reviewed``: the warehouse's reviewed (relation, entity) alias mappings, which win over
    the corrector's; with a synthetic ground truth, the result is scored against it."""
    corrector = cfg.corrector
    if corrector is not None and cfg.annotator.backend in KB_CANONICAL:
        # the knowledge base is the vocabulary: its names are canonical already, and unifying them
        # would merge distinct entities that share a name prefix ("Deckerview", "Deckerview United")
        corrector = corrector.model_copy(update={"unify_relations": False, "unify_entities": False})
    shard = annotate_shard(annotator, sample_shard, seed_dir, run_id, corrector, *reviewed)
    report = SeedStageReport(
        **shard.model_dump(), sample_shard=sample_shard,
        annotator=AnnotatorInfo(backend=cfg.annotator.backend, name=annotator.name, version=annotator.version,
                                prompt_id=annotator.prompt_id),
        endpoint=_endpoint_figures(annotator, shard.skipped, sample_shard, seed_dir, run_id))
    if ground_truth:
        report.quality_vs_gold = score_against_gold([shard.annotated_shard], ground_truth)
    return report


def _endpoint_figures(annotator: Annotator, skipped: bool, sample_shard: str, seed_dir: str, run_id: str) -> dict | None:
    """An endpoint annotator's requests, retries, tokens and cost for the seed shard. The run that annotated
    it records them beside the shard's completion marker; a rerun that skips the shard reports those,
    saying which run they come from, instead of its own zeros."""
    if not hasattr(annotator, "stats"):
        return None
    fs, path = fs_and_path(posixpath.join(seed_dir, "_done", posixpath.basename(sample_shard) + ".endpoint.json"))
    if skipped:
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as f:
            earlier = json.load(f)
        return {**earlier["endpoint"], "skipped": True, "figures_from_run": earlier["run_id"]}
    figures = annotator.stats.model_dump()
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump({"run_id": run_id, "endpoint": figures}, f)
    return figures
