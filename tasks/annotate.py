"""The shard-level annotation step every annotator backend shares.

An annotator (``schemas.documents.Annotator``) takes documents and returns, per document, the annotated
text in canonical markup (a pure insertion into the source text) or a failure with its reason. ``annotate_shard`` turns a
document shard into an annotated shard, a triplet shard and, when some documents failed, a failure
shard that the next run retries.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa

from schemas import markup, progress
from schemas.documents import Annotation, Annotator, Document
from schemas.reports import ShardAnnotationReport
from schemas.shards import ANNOTATED_SCHEMA, FAILURE_SCHEMA, TRIPLET_SCHEMA, triplet_id
from tasks.shardio import fs_and_path, read_table, write_table_atomic


def triplet_rows(doc: Document, ann: markup.Annotated, annotator: Annotator, run_id: str,
                 confidences: list[float] | None = None) -> list[dict]:
    """Triplet rows (TRIPLET_SCHEMA) of an annotated document, with the value's mention span."""
    rows = []
    for i, pc in enumerate(ann.calls):
        span = markup.mention_span(ann.text, pc.offset, pc.call.value)
        rows.append({
            "triplet_id": triplet_id(doc.doc_id, pc.offset, pc.call.entity, pc.call.relation, pc.call.value,
                                     annotator.name),
            "doc_id": doc.doc_id, "entity": pc.call.entity, "relation": pc.call.relation,
            "value": pc.call.value, "call_offset": pc.offset,
            "value_start": span[0] if span else None, "value_end": span[1] if span else None,
            "source_url": doc.url, "annotator": annotator.name, "annotator_version": annotator.version,
            "prompt_id": annotator.prompt_id, "run_id": run_id,
            "confidence": confidences[i] if confidences and i < len(confidences) else None,
        })
    return rows


def annotated_row(doc: Document, annotated_text: str, n_calls: int, annotator: Annotator, run_id: str) -> dict:
    return {
        "doc_id": doc.doc_id, "text": doc.text, "annotated_text": annotated_text, "n_calls": n_calls,
        "text_version": 0, "annotator": annotator.name, "annotator_version": annotator.version,
        "prompt_id": annotator.prompt_id, "category": doc.category, "url": doc.url, "run_id": run_id,
    }


def read_documents(shard: str, doc_ids: set[str] | None = None) -> list[Document]:
    t = read_table(shard, columns=["doc_id", "text", "category", "url"])
    docs = [Document(**r) for r in t.to_pylist()]
    return [d for d in docs if doc_ids is None or d.doc_id in doc_ids]


def to_annotated(doc: Document, annotation: Annotation) -> tuple[markup.Annotated | None, str | None, bool]:
    """The annotation as calls on the exact source text: (annotated, failure reason, repaired).

    Output that does not strip back to the source is realigned onto it (broken calls dropped), so the
    result never alters the source text.
    """
    from tasks.realign import realign

    if annotation.error is not None or annotation.annotated_text is None:
        return None, annotation.error or "no output", False
    try:
        ann = markup.parse(annotation.annotated_text)
        if ann.text == doc.text:
            return ann, None, False
    except markup.MarkupError:
        pass
    ann, _ = realign(doc.text, annotation.annotated_text)
    return ann, None, True


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].split(" after ", 1)[0].strip() or "unknown"


def shard_signature(doc_shard: str, annotator: Annotator, extra: str = "") -> str:
    """Identifies (input shard content, annotator version, settings): equal signature, equal outputs."""
    import hashlib

    from tasks.shardio import fs_and_path

    fs, path = fs_and_path(doc_shard)
    digest = hashlib.sha1()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    checksum = digest.hexdigest()
    key = "\x1f".join([posixpath.basename(doc_shard), str(checksum), annotator.name, annotator.version, extra])
    return hashlib.sha1(key.encode()).hexdigest()


def annotate_shard(annotator: Annotator, doc_shard: str, out_dir: str, run_id: str,
                   corrector=None, relation_overrides: dict[str, str] | None = None,
                   entity_overrides: dict[str, str] | None = None, batch_docs: int = 256) -> ShardAnnotationReport:
    """Annotate (and optionally correct) one document shard into annotated, triplet and failure shards.

    Outputs are named after the input shard under ``out_dir/{annotated,triplets,failures,rejected}``
    and written atomically; a completion marker (``out_dir/_done/<name>.json``) holding the shard
    signature makes a rerun skip a finished shard. A shard with failed documents is not marked done,
    so the next run retries it (a caching annotator pays nothing for the documents it already did).
    """
    import json
    import time

    from tasks.correct import correct

    t0 = time.perf_counter()
    name = posixpath.basename(doc_shard)
    extra = corrector.model_dump_json() if corrector is not None else ""
    signature = shard_signature(doc_shard, annotator, extra)
    paths = {k: posixpath.join(out_dir, k, name) for k in ("annotated", "triplets", "failures", "rejected")}
    marker = posixpath.join(out_dir, "_done", name + ".json")
    fs, _ = fs_and_path(out_dir)
    report = ShardAnnotationReport(shard=doc_shard, annotated_shard=paths["annotated"], triplet_shard=paths["triplets"])
    if fs.exists(fs_and_path(marker)[1]):
        with fs.open(fs_and_path(marker)[1], "r") as f:
            done = json.load(f)
        if done.get("signature") == signature:
            return report.model_copy(update={**done.get("report", {}), "skipped": True, "seconds": 0.0})

    docs = read_documents(doc_shard)
    report.docs = len(docs)
    pairs: list[tuple[Document, markup.Annotated]] = []
    confidences: dict[str, list[float] | None] = {}
    failures, reasons = [], {}
    for start in range(0, len(docs), batch_docs):
        batch = docs[start:start + batch_docs]
        for doc, annotation in zip(batch, annotator.annotate(batch)):
            ann, reason, repaired = to_annotated(doc, annotation)
            if ann is None:
                failures.append({"doc_id": doc.doc_id, "reason": reason, "annotator": annotator.name, "run_id": run_id})
                reasons[_reason_kind(reason)] = reasons.get(_reason_kind(reason), 0) + 1
                continue
            report.repaired += repaired
            pairs.append((doc, ann))
            confidences[doc.doc_id] = annotation.confidences
        progress.update(f"annotate {name}", min(start + batch_docs, len(docs)), len(docs), "docs")

    rejected = []
    if corrector is not None and pairs:
        result = correct(pairs, corrector, relation_overrides, entity_overrides)
        pairs = result.docs
        rejected = [{"doc_id": d, "reason": r, "annotator": annotator.name, "run_id": run_id} for d, r in result.dropped_docs]
        report.corrector_counts = result.counts
        report.relation_aliases = result.relation_aliases
        report.entity_aliases = result.entity_aliases
        confidences = {}  # calls moved or dropped: per-call confidences no longer line up

    ann_rows, tri_rows = [], []
    for doc, ann in pairs:
        ann_rows.append(annotated_row(doc, markup.render(ann), len(ann.calls), annotator, run_id))
        tri_rows.extend(triplet_rows(doc, ann, annotator, run_id, confidences.get(doc.doc_id)))
    # triplets first, annotated second, marker last: an annotated shard implies its triplet shard
    write_table_atomic(pa.Table.from_pylist(tri_rows, schema=TRIPLET_SCHEMA), paths["triplets"])
    write_table_atomic(pa.Table.from_pylist(ann_rows, schema=ANNOTATED_SCHEMA), paths["annotated"])
    for kind, rows in (("failures", failures), ("rejected", rejected)):
        if rows:
            write_table_atomic(pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA), paths[kind])
        elif fs.exists(fs_and_path(paths[kind])[1]):
            fs.rm(fs_and_path(paths[kind])[1])
    report.annotated, report.failed, report.rejected = len(ann_rows), len(failures), len(rejected)
    report.calls, report.failure_reasons = len(tri_rows), reasons
    report.seconds = round(time.perf_counter() - t0, 3)
    if not failures:
        fs.makedirs(fs_and_path(posixpath.dirname(marker))[1], exist_ok=True)
        with fs.open(fs_and_path(marker)[1], "w") as f:
            json.dump({"signature": signature, "report": report.model_dump(exclude={"shard", "seconds"})}, f)
    return report


def finished_shards(out_dir: str) -> tuple[list[str], list[str]]:
    """All (annotated, triplet) shard pairs under ``out_dir``, pairwise aligned."""
    from tasks.shardio import list_files

    ann = list_files(posixpath.join(out_dir, "annotated"), (".parquet",))
    tri = {posixpath.basename(p): p for p in list_files(posixpath.join(out_dir, "triplets"), (".parquet",))}
    pairs = [(a, tri[posixpath.basename(a)]) for a in ann if posixpath.basename(a) in tri]
    return [a for a, _ in pairs], [t for _, t in pairs]
