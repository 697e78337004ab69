"""One annotator interface, several backends; and the shard-level annotation step every backend shares.

An annotator takes documents and returns, per document, the annotated text in canonical markup
(a pure insertion into the source text) or a failure with its reason. ``annotate_shard`` turns a
document shard into an annotated shard, a triplet shard and, when some documents failed, a failure
shard that the next run retries.
"""

from __future__ import annotations

import posixpath
from typing import Protocol

import pyarrow as pa
from pydantic import BaseModel

from schemas import markup
from schemas.shards import (
    ANNOTATED_SCHEMA,
    TRIPLET_SCHEMA,
    triplet_id,
)
from tasks.shardio import fs_and_path, read_table, write_table_atomic

FAILURE_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("annotator", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


class Document(BaseModel):
    doc_id: str
    text: str  # escaped source text, as in document shards
    category: str | None = None
    url: str | None = None


class Annotation(BaseModel):
    """An annotator's answer for one document: annotated text, or a failure with its reason."""

    doc_id: str
    annotated_text: str | None = None  # canonical markup; strip(annotated_text) == document text
    error: str | None = None
    confidences: list[float] | None = None  # per call, in order, when the backend gives them
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Annotator(Protocol):
    name: str
    version: str
    prompt_id: str | None

    def annotate(self, docs: list[Document]) -> list[Annotation]:
        """One Annotation per document, same order; never raises for a single bad document."""
        ...


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
