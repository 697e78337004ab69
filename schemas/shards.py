"""pyarrow schemas of every shard kind, and the pydantic row models that mirror them.

Shards are zstd Parquet files and the source of truth; the warehouse is rebuilt from them.
Character spans (``value_start``/``value_end``/``call_offset``) index the shard's ``text``
column, which holds the *escaped* source text (see :mod:`schemas.markup`).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
from pydantic import BaseModel, Field

SHARD_COMPRESSION = "zstd"

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),  # source id, else "sha1:<content hash>"
        pa.field("text", pa.string(), nullable=False),  # escaped source text
        pa.field("content_hash", pa.string(), nullable=False),  # hex digest of the (escaped) text
        pa.field("source", pa.string()),  # dataset / subset name (Dolma "source")
        pa.field("url", pa.string()),
        pa.field("category", pa.string()),  # class label for class-conditional models, when known
        pa.field("metadata", pa.string()),  # JSON object, as given by the input
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_line", pa.int64(), nullable=False),  # 1-based line (JSONL/txt) or row (Parquet)
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_line", pa.int64()),  # null when the whole file is unreadable
        pa.field("reason", pa.string(), nullable=False),  # e.g. "malformed_json: Expecting ',' ..."
        pa.field("raw", pa.binary()),  # the offending bytes (capped), for inspection and replay
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

ANNOTATED_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),  # escaped source text, == strip(annotated_text)
        pa.field("annotated_text", pa.string(), nullable=False),  # canonical markup
        pa.field("n_calls", pa.int32(), nullable=False),
        pa.field("text_version", pa.int32(), nullable=False),  # 0 = original; >0 = rewrite
        pa.field("annotator", pa.string(), nullable=False),
        pa.field("annotator_version", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string()),
        pa.field("category", pa.string()),
        pa.field("url", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

TRIPLET_SCHEMA = pa.schema(
    [
        pa.field("triplet_id", pa.string(), nullable=False),  # see triplet_id()
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("entity", pa.string(), nullable=False),
        pa.field("relation", pa.string(), nullable=False),
        pa.field("value", pa.string(), nullable=False),
        pa.field("call_offset", pa.int64(), nullable=False),  # where the call is inserted in text
        pa.field("value_start", pa.int64()),  # span of the value's mention in text; null if none
        pa.field("value_end", pa.int64()),
        pa.field("source_url", pa.string()),
        pa.field("annotator", pa.string(), nullable=False),
        pa.field("annotator_version", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("confidence", pa.float32()),
    ]
)


def content_hash(text: str) -> str:
    """Stable content hash used for document ids and exact deduplication."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def triplet_id(doc_id: str, call_offset: int, entity: str, relation: str, value: str, annotator: str) -> str:
    """Deterministic id, so reloading the same shard never duplicates a triplet."""
    key = "\x1f".join((doc_id, str(call_offset), entity, relation, value, annotator))
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


class DocumentRow(BaseModel):
    doc_id: str
    text: str
    content_hash: str
    source: str | None = None
    url: str | None = None
    category: str | None = None
    metadata: str | None = None
    source_file: str
    source_line: int
    run_id: str


class QuarantineRow(BaseModel):
    source_file: str
    source_line: int | None = None
    reason: str
    raw: bytes | None = None
    run_id: str


class AnnotatedRow(BaseModel):
    doc_id: str
    text: str
    annotated_text: str
    n_calls: int
    text_version: int = 0
    annotator: str
    annotator_version: str
    prompt_id: str | None = None
    category: str | None = None
    url: str | None = None
    run_id: str


class TripletRow(BaseModel):
    triplet_id: str
    doc_id: str
    entity: str
    relation: str
    value: str
    call_offset: int
    value_start: int | None = None
    value_end: int | None = None
    source_url: str | None = None
    annotator: str
    annotator_version: str
    prompt_id: str | None = None
    run_id: str
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)


def rows_to_table(rows: list[BaseModel] | list[dict], schema: pa.Schema) -> pa.Table:
    """A table of the given schema from pydantic rows or dicts (missing fields become null)."""
    dicts = [r.model_dump() if isinstance(r, BaseModel) else r for r in rows]
    return pa.Table.from_pylist(dicts, schema=schema)
