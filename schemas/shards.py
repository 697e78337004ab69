"""pyarrow schemas of every shard kind.

Shards are zstd Parquet files and the source of truth; the warehouse is rebuilt from them.
Character spans (``value_start``/``value_end``/``call_offset``) index the shard's ``text``
column, which holds the *escaped* source text (see :mod:`schemas.markup`).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

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


FAILURE_SCHEMA = pa.schema(  # documents an annotator failed on (retried next run) or the corrector rejected
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("annotator", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


def content_hash(text: str) -> str:
    """Stable content hash used for document ids and exact deduplication."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def triplet_id(doc_id: str, call_offset: int, entity: str, relation: str, value: str, annotator: str) -> str:
    """Deterministic id, so reloading the same shard never duplicates a triplet."""
    key = "\x1f".join((doc_id, str(call_offset), entity, relation, value, annotator))
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """A table of the given schema from row dicts (missing fields become null)."""
    return pa.Table.from_pylist(rows, schema=schema)
