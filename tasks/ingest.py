"""Ingestion: corpus files -> zstd Parquet document shards, with exact dedup, quarantine and a manifest.

Inputs (files, folders searched recursively by extension, or glob patterns; local paths or fsspec URLs):

- JSON lines, Dolma/OLMo style (``.jsonl``, ``.json.gz``, ``.jsonl.gz``, ``.jsonl.zst``, ...): one object
  per line with the text under ``config.text_field``; ``id``, ``source``, ``url`` and ``metadata`` when
  present. Blank lines are not records.
- Parquet with a text column (Hugging Face exports); other columns are read like JSON fields.
- Plain ``.txt`` files: one document per file, the file's content as is; its id is its content hash
  (file names repeat across folders and carry no identity).

Output under ``config.output``::

    documents/part-<task>-<k>.parquet    DOCUMENT_SCHEMA, at most config.shard_docs rows each
    quarantine/part-<task>-<k>.parquet   QUARANTINE_SCHEMA: every record not written, with its reason
    _manifest/part-<task>.jsonl          one line per source file: checksum, counts, shards, run_id

Promises:

- Document id: the source id (as a string) when present and non-empty, else ``sha1:<content hash>``;
  ``content_hash`` is :func:`schemas.shards.content_hash` of the stored (escaped) text; ``source_file``
  is the file's URL (a local file by its absolute path); ``metadata`` is JSON text.
- Literal markup in a source text (``<|db_...``, ``[dblookup(``) is escaped with
  :func:`schemas.markup.escape`, so a corpus document can never become a lookup.
- Exact duplicates (same text, this run or an earlier one) are dropped and counted; a different text
  under an id already used is quarantined as ``duplicate_id`` rather than overwriting.
- Bad records (malformed JSON, invalid UTF-8, not an object, missing or empty text, bad id, a record
  over MAX_RECORD_BYTES) and unreadable files go to quarantine with their reason; per run,
  ``docs_read == docs_written + duplicates + quarantined``, or :class:`IngestReport` refuses to exist.
- Incremental: a source file recorded in the manifest with the same fingerprint or checksum (sha256
  of its bytes) is skipped. A file that could not be read to its end is retried on the next run.
- Crash-safe: a shard is written under a temporary name and moved into place when complete; a task's
  files enter the manifest only after all its shards are in place; each run first deletes shards no
  manifest line refers to. So a crash or rerun loses and duplicates nothing. The manifest is what makes
  a shard part of the output (delete ``_manifest`` to start over). One ingest per output folder at a time.
- Memory: each worker holds about one block (``config.batch_bytes`` of uncompressed input) and one
  pending row group per shard kind, whatever the corpus size. The dedup index holds two 64-bit keys
  per unique document (text hash prefix, id hash prefix) in numpy open-addressing tables: 24-48 bytes
  per unique document.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import posixpath
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import msgspec
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq
from isal import igzip, isal_zlib
from pydantic import BaseModel, model_validator

from schemas.configs import IngestConfig
from schemas.errors import UserInputError
from schemas.markup import escape, needs_escape
from schemas.reports import IngestReport
from schemas.shards import DOCUMENT_SCHEMA, QUARANTINE_SCHEMA, SHARD_COMPRESSION
from tasks.shardio import as_url, fs_and_path, temporary_path

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz", ".jsonl.zst", ".json.zst",
                  ".jsonl.zstd", ".json.zstd")
PARQUET_SUFFIXES = (".parquet",)
TXT_SUFFIXES = (".txt",)
CORPUS_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TXT_SUFFIXES

MAX_RECORD_BYTES = 1 << 28  # a longer line or .txt file is quarantined unread, so memory stays bounded
RAW_BYTES_CAP = 1 << 20  # quarantine keeps at most this much of an offending record
READ_BYTES = 1 << 20  # read granularity: a decompression error loses at most this much before it
ROW_GROUP_BYTES = 32 << 20  # rows buffered per shard writer before a Parquet row group is written
MIN_TASK_BYTES = 16 << 20  # small files are grouped into tasks of at least this many (compressed) bytes
MAX_TASK_BYTES = 512 << 20

KEEP, DUPLICATE, DUPLICATE_ID, TEXTLESS = 0, 1, 2, 3  # per-document outcome codes
_DICTIONARY_COLUMNS = ["source", "category", "source_file", "run_id"]  # few distinct values per shard


class InputError(UserInputError):
    """An input location that does not exist, matches no corpus file, or is not a corpus file."""


# ---------------------------------------------------------------- inputs, manifest, plan


@dataclass(frozen=True)
class SourceFile:
    url: str  # spelled like the input that named it
    size: int
    fingerprint: str  # cheap change detector from the filesystem's listing (size, mtime, etag, ...)
    checksum: str | None = None  # "sha256:<hex>" when computed before ingestion


def kind_of(url: str) -> str | None:
    """'jsonl', 'parquet' or 'txt' from the file name; None when it is not a corpus file."""
    name = url.lower()
    for kind, suffixes in (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("txt", TXT_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def _fingerprint(info: dict) -> str:
    keys = ("size", "mtime", "created", "ETag", "etag", "md5Hash", "crc32c", "generation", "blob_id", "LastModified")
    picked = {k: info[k] for k in keys if info.get(k) is not None}
    return hashlib.sha1(orjson.dumps(picked, default=str, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def expand_inputs(inputs: list[str], exclude: str | None = None) -> list[SourceFile]:
    """Every corpus file named by ``inputs`` (files, folders, globs), once each, in input order then name
    order; files under ``exclude`` (the output folder) are left out. Raises :class:`InputError` for an
    input that does not exist, matches no corpus file, or is a file of an unsupported type."""
    if not inputs:
        raise InputError("no inputs given: pass corpus files, folders or glob patterns")
    excluded = fs_and_path(exclude)[1].rstrip("/") + "/" if exclude else None
    files: dict[str, SourceFile] = {}
    for loc in inputs:
        fs, path = fs_and_path(loc)
        if any(c in path for c in "*?["):
            found = fs.glob(path, detail=True)
            infos = {}
            for p, info in found.items():
                infos.update(fs.find(p, detail=True) if info["type"] == "directory" else {p: info})
        elif fs.isdir(path):
            infos = fs.find(path, detail=True)
        elif fs.exists(path):
            if kind_of(path) is None:
                raise InputError(f"input {loc!r} is not a corpus file: name it *.jsonl[.gz|.zst], "
                                 f"*.json.gz, *.parquet or *.txt, or pass its folder")
            infos = {path: fs.info(path)}
        else:
            raise InputError(f"input {loc!r} does not exist: pass an existing file, folder or glob pattern")
        matched = [
            (p, info) for p, info in sorted(infos.items())
            if info.get("type", "file") == "file" and kind_of(p) is not None
            and not posixpath.basename(p).startswith((".", "_"))
            and not (excluded and (p.rstrip("/") + "/").startswith(excluded))
        ]
        if not matched:
            raise InputError(f"input {loc!r} matches no corpus file ({', '.join(CORPUS_SUFFIXES)}): "
                             f"check the path or pattern")
        for p, info in matched:
            url = as_url(fs, p, loc)
            files.setdefault(url, SourceFile(url, int(info.get("size") or 0), _fingerprint(info)))
    return list(files.values())


def read_manifest(output: str) -> list[dict]:
    """Every manifest line under ``output``: one per source file per ingest task."""
    fs, root = fs_and_path(output)
    folder = posixpath.join(root, "_manifest")
    if not fs.isdir(folder):
        return []
    entries = []
    for p in sorted(fs.find(folder)):
        if p.endswith(".jsonl"):
            entries.extend(orjson.loads(line) for line in fs.cat_file(p).splitlines() if line.strip())
    return entries


def remove_orphans(output: str, manifest: list[dict]) -> list[str]:
    """Delete our shards and temporary files that no manifest line refers to (left by a crash or an
    interrupted run); returns their paths. Other files in the output folder are left alone."""
    fs, root = fs_and_path(output)
    referenced = {posixpath.join(root, s) for e in manifest for s in e["document_shards"] + e["quarantine_shards"]}
    removed = []
    for sub in ("documents", "quarantine", "_manifest"):
        folder = posixpath.join(root, sub)
        if not fs.isdir(folder):
            continue
        for p in fs.find(folder):
            name = posixpath.basename(p)
            ours = name.startswith("part-") and (name.endswith(".tmp") or sub != "_manifest")
            if ours and p not in referenced:
                fs.rm(p)
                removed.append(p)
    return removed


def _sha256_of(url: str) -> str:
    fs, path = fs_and_path(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def files_to_ingest(files: list[SourceFile], manifest: list[dict]) -> tuple[list[SourceFile], list[SourceFile]]:
    """(to ingest, skipped). Skipped: the manifest holds the same url and fingerprint, or the same
    checksum (computed here only for files whose size equals that of an ingested file)."""
    done = [e for e in manifest if e["status"] == "ingested"]
    by_url = {(e["url"], e["fingerprint"]) for e in done}
    checksums = {e["checksum"] for e in done if e.get("checksum")}
    sizes = {e["size"] for e in done}
    todo, skipped = [], []
    for f in files:
        if (f.url, f.fingerprint) in by_url:
            skipped.append(f)
        elif f.size in sizes:
            f = SourceFile(f.url, f.size, f.fingerprint, _sha256_of(f.url))
            (skipped if f.checksum in checksums else todo).append(f)
        else:
            todo.append(f)
    return todo, skipped


def plan_tasks(files: list[SourceFile], workers: int) -> list[list[SourceFile]]:
    """Files grouped into tasks (one worker, one set of shards each): whole files, small ones grouped so
    each task has at least clamp(total / (4 * workers), MIN_TASK_BYTES, MAX_TASK_BYTES) bytes. One
    worker keeps input order (the first copy of a duplicate is kept); several take the largest first."""
    target = min(max(sum(f.size for f in files) // (4 * workers), MIN_TASK_BYTES), MAX_TASK_BYTES)
    tasks: list[list[SourceFile]] = []
    current: list[SourceFile] = []
    current_bytes = 0
    for f in files:
        current.append(f)
        current_bytes += f.size
        if current_bytes >= target:
            tasks.append(current)
            current, current_bytes = [], 0
    if current:
        tasks.append(current)
    return tasks if workers == 1 else sorted(tasks, key=lambda t: -sum(f.size for f in t))


# ---------------------------------------------------------------- dedup


class KeySet:
    """A set of non-zero 64-bit keys in one numpy open-addressing table (linear probing, load 1/3..2/3,
    so 12-24 bytes per key). Keys are hash prefixes, hence already uniform: the slot is the low bits."""

    def __init__(self, capacity: int = 1 << 16):
        self._table = np.zeros(capacity, np.uint64)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def contains(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), bool)
        mask = np.uint64(len(self._table) - 1)
        slots = keys & mask
        todo = np.arange(len(keys))
        while todo.size:
            seen = self._table[slots[todo]]
            hit = seen == keys[todo]
            found[todo[hit]] = True
            todo = todo[(seen != 0) & ~hit]
            slots[todo] = (slots[todo] + np.uint64(1)) & mask
        return found

    def add(self, keys: np.ndarray) -> None:
        """Insert keys that are neither in the set nor repeated among themselves."""
        if 3 * (self._size + len(keys)) > 2 * len(self._table):
            capacity = len(self._table)
            while 3 * (self._size + len(keys)) > capacity:
                capacity *= 2
            old = self._table[self._table != 0]
            self._table = np.zeros(capacity, np.uint64)
            self._place(old)
        self._place(keys)
        self._size += len(keys)

    def _place(self, keys: np.ndarray) -> None:
        table, mask = self._table, np.uint64(len(self._table) - 1)
        slots = keys & mask
        todo = np.arange(len(keys))
        while todo.size:
            free = table[slots[todo]] == 0
            cand = todo[free]
            table[slots[cand]] = keys[cand]  # keys racing for one slot: one wins, the others probe on
            won = table[slots[cand]] == keys[cand]
            todo = np.concatenate([todo[~free], cand[~won]])
            slots[todo] = (slots[todo] + np.uint64(1)) & mask


class Deduplicator:
    """Exact dedup across files and runs on 64-bit prefixes of the text and id hashes (a false duplicate
    needs a 64-bit collision: ~2.7e-4 chance per 100M documents)."""

    def __init__(self) -> None:
        self.texts = KeySet()
        self.ids = KeySet()

    def check(self, text_keys: np.ndarray, id_keys: np.ndarray) -> np.ndarray:
        """Per document, in order: KEEP, DUPLICATE (text seen before) or DUPLICATE_ID (new text under an id
        seen before); kept documents are remembered."""
        text_keys, id_keys = np.maximum(text_keys, 1), np.maximum(id_keys, 1)  # 0 marks a free slot
        text_seen, id_seen = self.texts.contains(text_keys), self.ids.contains(id_keys)
        codes = np.empty(len(text_keys), np.uint8)
        block_texts: set[int] = set()
        block_ids: set[int] = set()
        for i, (t, d, ts, ds) in enumerate(zip(text_keys.tolist(), id_keys.tolist(), text_seen.tolist(),
                                               id_seen.tolist())):
            if ts or t in block_texts:
                codes[i] = DUPLICATE
            elif ds or d in block_ids:
                codes[i] = DUPLICATE_ID
            else:
                codes[i] = KEEP
                block_texts.add(t)
                block_ids.add(d)
        keep = codes == KEEP
        self.texts.add(text_keys[keep])
        self.ids.add(id_keys[keep])
        return codes

    def remember_shard(self, url: str) -> None:
        """Remember the documents of an existing document shard (dedup across runs)."""
        fs, path = fs_and_path(url)
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=["doc_id", "content_hash"]):
                hashes = "".join(batch.column("content_hash").to_pylist())
                digests = np.frombuffer(bytes.fromhex(hashes), np.uint8).reshape(-1, 20)
                self.check(_key64(digests), _key64(_sha1_digests(batch.column("doc_id"))))


# ---------------------------------------------------------------- hashing and escaping over Arrow buffers


def _offsets_data(arr: pa.StringArray) -> tuple[np.ndarray, memoryview]:
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset:arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    return offsets, memoryview(data) if data is not None else memoryview(b"")


def _sha1_digests(arr: pa.StringArray) -> np.ndarray:
    """sha1 of each string's UTF-8 bytes, read straight from the Arrow buffers: shape (n, 20) uint8."""
    offsets, data = _offsets_data(arr)
    o = offsets.tolist()
    sha1 = hashlib.sha1
    joined = b"".join([sha1(data[a:b]).digest() for a, b in zip(o, o[1:])])
    return np.frombuffer(joined, np.uint8).reshape(-1, 20)


def _key64(digests: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(digests[:, :8]).view("<u8").ravel()


_HEX = np.frombuffer(b"".join(b"%02x" % i for i in range(256)), np.uint8).reshape(256, 2)


def _hex(digests: np.ndarray) -> pa.StringArray:
    n, width = digests.shape
    chars = np.ascontiguousarray(_HEX[digests]).reshape(-1)
    offsets = np.arange(0, (n + 1) * 2 * width, 2 * width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars))


def _marker_rows(text: pa.StringArray) -> np.ndarray:
    """Rows whose text holds '|db_' or 'dblookup(': a superset of the rows escape() changes, found with
    two vectorised byte scans so that the common case costs no per-document Python."""
    offsets, data = _offsets_data(text)
    a = np.frombuffer(data, np.uint8)[:offsets[-1]] if len(text) else np.zeros(0, np.uint8)
    pipe = np.flatnonzero(a[:-3] == ord("|"))
    pipe = pipe[(a[pipe + 1] == ord("d")) & (a[pipe + 2] == ord("b")) & (a[pipe + 3] == ord("_"))]
    paren = np.flatnonzero(a[8:] == ord("(")) + 8
    for j, ch in enumerate(b"dblookup"):
        paren = paren[a[paren - 8 + j] == ch]
    pos = np.concatenate([pipe, paren])
    rows = np.searchsorted(offsets, pos, side="right") - 1
    return np.unique(rows[(rows >= 0) & (rows < len(text))])


def escape_texts(text: pa.StringArray) -> pa.StringArray:
    """:func:`schemas.markup.escape` applied to every text that needs it."""
    rows = _marker_rows(text)
    if not rows.size:
        return text
    originals = [text[int(i)].as_py() for i in rows]
    changed = [(int(i), escape(t)) for i, t in zip(rows, originals) if needs_escape(t)]
    if not changed:
        return text
    mask = np.zeros(len(text), bool)
    mask[[i for i, _ in changed]] = True
    return pc.replace_with_mask(text, pa.array(mask), pa.array([t for _, t in changed], pa.string()))


# ---------------------------------------------------------------- records -> parsed batches


@dataclass
class ParsedBatch:
    """The records of one block: columns of the parsed ones (text as read, null when missing) and the
    quarantine entries of those that could not be parsed at all."""

    text: pa.StringArray
    doc_id: pa.StringArray  # the source id, null when absent
    source: pa.StringArray
    url: pa.StringArray
    category: pa.StringArray
    metadata: pa.StringArray  # JSON text
    lines: np.ndarray  # 1-based line (JSONL) or row (Parquet) of each parsed record
    raw: Callable[[int], bytes]  # the input bytes of parsed record i (capped), for quarantine
    quarantine: list = field(default_factory=list)  # (line or None, reason, raw bytes or None)
    records: int = 0  # records read: parsed + quarantined here
    nbytes: int = 0  # uncompressed input bytes


def _strings(values: list) -> pa.StringArray:
    """A string column from JSON values; numbers and objects are kept as their JSON text."""
    try:
        return pa.array(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([_as_text(v) for v in values], pa.string())


def _as_text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def _batch(text: pa.Array, fields: list[tuple], lines, raw, quarantine, records: int, nbytes: int) -> ParsedBatch:
    ids, source, url, category, metadata = zip(*fields) if fields else ([], [], [], [], [])
    return ParsedBatch(text, pa.array(ids, pa.string()), _strings(list(source)), _strings(list(url)),
                       _strings(list(category)), pa.array(metadata, pa.string()), np.asarray(lines, np.int64),
                       raw, quarantine, records, nbytes)


def _empty_batch(quarantine: list, records: int) -> ParsedBatch:
    return _batch(pa.array([], pa.string()), [], [], lambda j: b"", quarantine, records, 0)


def record_fields(obj: dict, config: IngestConfig) -> tuple | str:
    """(id, source, url, category, metadata JSON) of a parsed record other than its text, or the reason
    to quarantine it.

    ``metadata`` is the record's ``metadata`` object when present, else an object of its other fields
    (Hugging Face style rows keep their extra columns); ``url`` and the category fall back to metadata."""
    doc_id = obj.get(config.id_field)
    if doc_id is not None and not isinstance(doc_id, str):
        if not isinstance(doc_id, int) or isinstance(doc_id, bool):
            return f"bad_id: {config.id_field!r} is a {type(doc_id).__name__}, not a string or integer"
        doc_id = str(doc_id)
    meta = obj.get("metadata")
    if meta is None:
        meta_obj = {k: v for k, v in obj.items() if k not in _mapped_fields(config)} or None
    else:
        meta_obj = meta
    metadata = None if meta_obj is None else orjson.dumps(meta_obj, default=str, option=orjson.OPT_NON_STR_KEYS)
    url = obj.get("url")
    category = obj.get(config.category_field) if config.category_field else None
    if isinstance(meta, dict):
        url = meta.get("url") if url is None else url
        category = meta.get(config.category_field) if category is None and config.category_field else category
    return doc_id or None, obj.get("source"), url, category, metadata


def _mapped_fields(config: IngestConfig) -> frozenset:
    return frozenset(f for f in (config.text_field, config.id_field, "source", "url", "metadata",
                                 config.category_field) if f)


@functools.lru_cache
def _decoders(text_field: str, id_field: str, category_field: str | None) -> tuple[msgspec.json.Decoder, ...]:
    """msgspec decoders of a record (text and metadata kept raw, other fields skipped unread) and of
    the url and category inside metadata."""
    rename = {"text": text_field, "id": id_field, "category": category_field or "\0"}
    record = msgspec.defstruct("Record", [("text", msgspec.Raw, msgspec.UNSET), ("id", Any, None),
                                          ("source", Any, None), ("url", Any, None), ("category", Any, None),
                                          ("metadata", msgspec.Raw, msgspec.UNSET)], rename=rename, gc=False)
    meta = msgspec.defstruct("Meta", [("url", Any, None), ("category", Any, None)], rename=rename, gc=False)
    return msgspec.json.Decoder(record), msgspec.json.Decoder(meta)


def _valid_utf8(data) -> bool:
    """Whether ``data`` (a buffer or an Arrow array) is valid UTF-8, checked by Arrow's validator."""
    if not isinstance(data, pa.Array):
        buf = pa.py_buffer(data)
        data = pa.StringArray.from_buffers(1, pa.py_buffer(np.array([0, len(buf)], np.int32)), buf)
    try:
        data.validate(full=True)
        return True
    except pa.ArrowInvalid:
        return False


def _arrow_texts(body, n: int, text_field: str) -> pa.StringArray | None:
    """The text field of ``n`` JSON lines (no blank ones) parsed by Arrow straight into a UTF-8 column,
    far cheaper than Python strings; None when Arrow cannot (a non-string text, say)."""
    options = pj.ParseOptions(explicit_schema=pa.schema([(text_field, pa.string())]),
                              unexpected_field_behavior="ignore")
    try:
        table = pj.read_json(pa.BufferReader(body), parse_options=options,
                             read_options=pj.ReadOptions(use_threads=False, block_size=len(body) + 1))
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None
    return table.column(0).combine_chunks() if table.num_rows == n else None


def _line_spans(block: memoryview) -> list[tuple[int, int]]:
    a = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(a == 10).tolist()
    if len(a) and a[-1] != 10:
        ends.append(len(a))
    return list(zip([0] + [e + 1 for e in ends[:-1]], ends))


def parse_jsonl_block(block: bytes | memoryview, first_line: int, config: IngestConfig,
                      n_lines: int | None = None) -> ParsedBatch:
    """The records of a block of whole JSON lines; ``first_line`` is the 1-based number of its first line.

    Fast path for a clean block: msgspec reads the small fields (the text is skipped, metadata kept as
    raw JSON) and Arrow's JSON parser reads the texts. A block with a bad or blank line, or records
    without a metadata object, is read line by line instead."""
    mv = memoryview(block)
    if n_lines is None:
        n_lines = len(_line_spans(mv))
    record_decoder, meta_decoder = _decoders(config.text_field, config.id_field, config.category_field)
    try:
        records = record_decoder.decode_lines(mv) if _valid_utf8(mv) else None
    except (msgspec.DecodeError, UnicodeDecodeError):
        records = None
    if records is None or len(records) != n_lines or any(r.metadata is msgspec.UNSET for r in records):
        return _parse_jsonl_lines(mv, first_line, config)
    text = _arrow_texts(mv, n_lines, config.text_field)
    ids = [r.id for r in records]
    if text is None or not all(i is None or type(i) is str or type(i) is int for i in ids):
        return _parse_jsonl_lines(mv, first_line, config)
    metadata = [None if m == _NULL else bytes(m) for m in (r.metadata for r in records)]
    url, category = [r.url for r in records], [r.category for r in records]
    for i, r in enumerate(records):
        if (r.url is None or (r.category is None and config.category_field)) and metadata[i]:
            try:
                meta = meta_decoder.decode(metadata[i])
            except msgspec.ValidationError:  # metadata is not an object
                continue
            url[i] = meta.url if url[i] is None else url[i]
            category[i] = meta.category if category[i] is None else category[i]
    spans = []

    def raw(j: int) -> bytes:
        spans[:] = spans or _line_spans(mv)
        return bytes(mv[spans[j][0]:spans[j][1]][:RAW_BYTES_CAP])

    doc_id = _strings(ids)
    return ParsedBatch(text, pc.if_else(pc.equal(doc_id, ""), None, doc_id),
                       _strings([r.source for r in records]), _strings(url), _strings(category),
                       pa.array(metadata, pa.string()), np.arange(first_line, first_line + n_lines),
                       raw, [], n_lines, mv.nbytes)


_NULL = msgspec.Raw(b"null")


def _parse_jsonl_lines(mv: memoryview, first_line: int, config: IngestConfig) -> ParsedBatch:
    """parse_jsonl_block, one line at a time with orjson (which checks UTF-8 too): every bad line goes to
    quarantine with its reason; blank lines are not records."""
    text_field = config.text_field
    texts, fields, lines, spans, quarantine = [], [], [], [], []
    records = 0
    for i, (s, e) in enumerate(_line_spans(mv)):
        line = mv[s:e]
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raw = bytes(line)
            if raw.strip():
                records += 1
                quarantine.append((first_line + i, _json_error_reason(raw, exc), raw[:RAW_BYTES_CAP]))
            continue
        records += 1
        text = obj.get(text_field) if type(obj) is dict else None
        if type(obj) is not dict:
            reason = f"not_an_object: a JSON {type(obj).__name__}"
        elif text is not None and not isinstance(text, str):
            reason = f"missing_text: {text_field!r} is a {type(text).__name__}, not a string"
        else:
            reason = record_fields(obj, config)
        if isinstance(reason, str):
            quarantine.append((first_line + i, reason, bytes(line[:RAW_BYTES_CAP])))
            continue
        texts.append(text)
        fields.append(reason)
        lines.append(first_line + i)
        spans.append((s, e))
    return _batch(pa.array(texts, pa.string()), fields, lines,
                  lambda j: bytes(mv[spans[j][0]:spans[j][1]][:RAW_BYTES_CAP]), quarantine, records, mv.nbytes)


def _json_error_reason(raw: bytes, exc: Exception) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"invalid_utf8: {bad}"
    return f"malformed_json: {exc}"


def _line_blocks(read: Callable[[int], bytes], block_bytes: int) -> Iterator[tuple[bytes | memoryview, int]]:
    """(block, lines) pairs of whole lines of about ``block_bytes``, in order; a line over MAX_RECORD_BYTES
    comes alone as (its first RAW_BYTES_CAP bytes, -1) and the rest of it is skipped unread. A read error
    is raised after the complete lines read before it (reads are of READ_BYTES, so little is lost)."""
    tail = b""
    while True:
        parts, size, error, end = [tail], 0, None, False
        try:
            while size < block_bytes:
                chunk = read(min(READ_BYTES, block_bytes))
                if not chunk:
                    end = True
                    break
                parts.append(chunk)
                size += len(chunk)
        except _UNREADABLE as exc:
            error = exc
        if end and len(parts) == 1:
            if tail:
                yield tail, 1  # the last line has no line end
            return
        buf = b"".join(parts)
        cut = buf.rfind(b"\n") + 1
        if cut:
            yield memoryview(buf)[:cut], buf.count(b"\n", 0, cut)
            tail = buf[cut:]
        elif len(buf) <= MAX_RECORD_BYTES:
            tail = buf
        else:
            yield buf[:RAW_BYTES_CAP], -1
            chunk = b""
            while error is None and b"\n" not in chunk:
                try:
                    chunk = read(READ_BYTES)
                except _UNREADABLE as exc:
                    error = exc
                if not chunk:
                    break
            tail = chunk[chunk.find(b"\n") + 1:] if b"\n" in chunk else b""
        if error is not None:
            raise error


class _ChecksumReader:
    """A binary file read front to back, with the sha256 of the bytes read so far."""

    def __init__(self, f):
        self.f, self.sha256, self.closed = f, hashlib.sha256(), False

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read(n)
        self.sha256.update(chunk)
        return chunk

    def readinto(self, b) -> int:  # gzip reads this way
        chunk = self.read(len(b))
        b[:len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        self.closed = True
        self.f.close()


def _decompressed(raw: _ChecksumReader, url: str):
    """A readable stream of the file's content: gzip through ISA-L (about twice zlib's speed), zstd
    through Arrow."""
    name = url.lower()
    if name.endswith(".gz"):
        return igzip.IGzipFile(fileobj=raw, mode="rb")
    if name.endswith((".zst", ".zstd")):
        return pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd")
    return raw


_UNREADABLE = (OSError, EOFError, pa.ArrowException, isal_zlib.error)  # reading or decoding a file, not bugs


def read_jsonl(url: str, config: IngestConfig, result: "FileResult") -> Iterator[ParsedBatch]:
    """Parsed batches of a JSON lines file; an unreadable file or remainder becomes one quarantine record."""
    fs, path = fs_and_path(url)
    try:
        raw = _ChecksumReader(fs.open(path, "rb"))
    except _UNREADABLE as exc:
        result.unreadable = True
        yield _empty_batch([(None, f"unreadable_file: {_describe(exc)}", None)], 1)
        return
    with contextlib.closing(raw):
        yield from _jsonl_batches(raw, url, config, result)


def _jsonl_batches(raw: "_ChecksumReader", url: str, config: IngestConfig, result: "FileResult") -> Iterator[ParsedBatch]:
    blocks = _line_blocks(_decompressed(raw, url).read, config.batch_bytes)
    line = 1
    while True:
        try:
            block, n_lines = next(blocks)
        except StopIteration:
            result.checksum = "sha256:" + raw.sha256.hexdigest()
            return
        except _UNREADABLE as exc:
            result.unreadable = True
            yield _empty_batch([(None, f"unreadable_file: {_describe(exc)} (after line {line - 1})", None)], 1)
            return
        if n_lines < 0:
            yield _empty_batch([(line, f"record_too_large: line over {MAX_RECORD_BYTES} bytes", block)], 1)
            line += 1
            continue
        yield parse_jsonl_block(block, line, config, n_lines)
        line += n_lines


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]


def read_txt(url: str, config: IngestConfig, result: "FileResult") -> Iterator[ParsedBatch]:
    """A .txt file as one document (its whole content), or one quarantine record."""
    fs, path = fs_and_path(url)
    try:
        if fs.size(path) > MAX_RECORD_BYTES:
            with fs.open(path, "rb") as f:
                head = f.read(RAW_BYTES_CAP)
            result.checksum = _sha256_of(url)
            yield _empty_batch([(1, f"record_too_large: file over {MAX_RECORD_BYTES} bytes", head)], 1)
            return
        data = fs.cat_file(path)
    except _UNREADABLE as exc:
        result.unreadable = True
        yield _empty_batch([(None, f"unreadable_file: {_describe(exc)}", None)], 1)
        return
    result.checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as bad:
        yield _empty_batch([(1, f"invalid_utf8: {bad}", data[:RAW_BYTES_CAP])], 1)
        return
    batch = _batch(pa.array([text], pa.string()), [(None,) * 5], [1], lambda j: data[:RAW_BYTES_CAP], [], 1, len(data))
    yield batch


def read_parquet(url: str, config: IngestConfig, result: "FileResult") -> Iterator[ParsedBatch]:
    """Parsed batches of a Parquet file, rows numbered from 1; a missing or non-text text column or an
    unreadable file becomes one quarantine record for the file."""
    fs, path = fs_and_path(url)
    try:
        pf = pq.ParquetFile(fs.open(path, "rb"))
        md = pf.metadata
        row_bytes = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups)) // max(1, md.num_rows)
        batches = pf.iter_batches(batch_size=max(1, config.batch_bytes // max(1, row_bytes)))
    except _UNREADABLE as exc:
        result.unreadable = True
        yield _empty_batch([(None, f"unreadable_file: {_describe(exc)}", None)], 1)
        return
    schema = pf.schema_arrow
    text_type = schema.field(config.text_field).type if config.text_field in schema.names else None
    if text_type is None or not any(is_(text_type) for is_ in (pa.types.is_string, pa.types.is_large_string,
                                                               pa.types.is_binary, pa.types.is_large_binary)):
        what = "no column" if text_type is None else f"a {text_type} column"
        result.unreadable = True  # retried next run, e.g. with the right text_field
        yield _empty_batch([(None, f"missing_text: {what} {config.text_field!r} (columns: "
                                   f"{', '.join(schema.names)}); set text_field", None)], 1)
        return
    row = 1
    while True:
        try:
            rb = next(batches)
        except StopIteration:
            break
        except _UNREADABLE as exc:
            result.unreadable = True
            yield _empty_batch([(None, f"unreadable_file: {_describe(exc)} (after row {row - 1})", None)], 1)
            return
        yield _parquet_batch(rb, row, config)
        row += rb.num_rows
    result.checksum = _sha256_of(url)


def _parquet_batch(rb: pa.RecordBatch, first_row: int, config: IngestConfig) -> ParsedBatch:
    text = rb.column(config.text_field)
    bad_utf8: dict[int, str] = {}
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)) or not _valid_utf8(text):
        decoded = []
        for i, value in enumerate(text.cast(pa.large_binary()).to_pylist()):
            try:
                decoded.append(None if value is None else value.decode("utf-8"))
            except UnicodeDecodeError as bad:
                bad_utf8[i] = f"invalid_utf8: {bad}"
                decoded.append(None)
        text = pa.array(decoded, pa.string())
    text = text.cast(pa.string())
    rows = rb.drop_columns([config.text_field]).to_pylist()

    def raw(i: int) -> bytes:
        row = {**rows[i], config.text_field: None if i in bad_utf8 else text[i].as_py()}
        return orjson.dumps(row, default=str, option=orjson.OPT_NON_STR_KEYS)[:RAW_BYTES_CAP]

    fields, good, quarantine = [], [], []
    for i, row in enumerate(rows):
        reason = bad_utf8.get(i) or record_fields(row, config)
        if isinstance(reason, str):
            quarantine.append((first_row + i, reason, raw(i)))
            continue
        fields.append(reason)
        good.append(i)
    if len(good) < len(rows):
        text = text.take(pa.array(good, pa.int64()))
    return _batch(text, fields, [first_row + i for i in good], lambda j: raw(good[j]), quarantine, len(rows),
                  rb.nbytes)


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "txt": read_txt}


# ---------------------------------------------------------------- shards


class ShardWriter:
    """Streams tables into zstd Parquet shards ``{prefix}-{k:05d}.parquet`` of at most ``max_rows`` rows;
    each shard is written under a temporary name and moved into place when full or on :meth:`close`."""

    def __init__(self, prefix: str, schema: pa.Schema, max_rows: int):
        self.prefix, self.schema, self.max_rows = prefix, schema, max_rows
        self.fs, _ = fs_and_path(prefix)
        self.shards: list[str] = []
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        self._rows = 0  # rows in the current shard, written or pending
        self._file = self._writer = self._tmp = None

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            room = self.max_rows - self._rows
            part, table = table.slice(0, room), table.slice(room)
            self._pending.append(part)
            self._pending_bytes += part.get_total_buffer_size()
            self._rows += part.num_rows
            if self._rows == self.max_rows:
                self._finish_shard()
            elif self._pending_bytes >= ROW_GROUP_BYTES:
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            url = f"{self.prefix}-{len(self.shards):05d}.parquet"
            self._tmp = temporary_path(fs_and_path(url)[1])
            self.fs.makedirs(posixpath.dirname(self._tmp), exist_ok=True)
            self._file = self.fs.open(self._tmp, "wb")
            self._writer = pq.ParquetWriter(
                self._file, self.schema, compression=SHARD_COMPRESSION,
                use_dictionary=[c for c in _DICTIONARY_COLUMNS if c in self.schema.names])
        self._writer.write_table(pa.concat_tables(self._pending), row_group_size=1 << 30)
        self._pending, self._pending_bytes = [], 0

    def _finish_shard(self) -> None:
        self._flush()
        self._writer.close()
        self._file.close()
        url = f"{self.prefix}-{len(self.shards):05d}.parquet"
        self.fs.mv(self._tmp, fs_and_path(url)[1])
        self.shards.append(url)
        self._file = self._writer = self._tmp = None
        self._rows = 0

    def close(self) -> list[str]:
        """Finish the last shard; returns every shard written, in order."""
        if self._rows:
            self._finish_shard()
        return self.shards

    def abort(self) -> None:
        """Remove the unfinished shard (finished ones are left for the orphan sweep)."""
        if self._writer is not None:
            self._file.close()
            if self.fs.exists(self._tmp):
                self.fs.rm(self._tmp)
        self._pending, self._writer = [], None


# ---------------------------------------------------------------- one task: files -> shards


@dataclass
class FileResult:
    url: str
    size: int
    fingerprint: str
    checksum: str | None = None
    unreadable: bool = False
    docs_read: int = 0
    docs_written: int = 0
    duplicates: int = 0
    quarantined: int = 0
    bytes_read: int = 0
    reasons: Counter = field(default_factory=Counter)


@dataclass
class TaskResult:
    key: str
    files: list[FileResult]
    document_shards: list[str]
    quarantine_shards: list[str]


def ingest_files(files: list[SourceFile], key: str, config: IngestConfig, run_id: str,
                 check: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> TaskResult:
    """Read ``files`` into document and quarantine shards ``part-<key>-*``; ``check`` is the dedup
    (:meth:`Deduplicator.check`, possibly in another process). Nothing is recorded in the manifest here."""
    docs = ShardWriter(posixpath.join(config.output, "documents", f"part-{key}"), DOCUMENT_SCHEMA, config.shard_docs)
    bad = ShardWriter(posixpath.join(config.output, "quarantine", f"part-{key}"), QUARANTINE_SCHEMA, config.shard_docs)
    results = []
    try:
        for f in files:
            result = FileResult(f.url, f.size, f.fingerprint)
            for batch in READERS[kind_of(f.url)](f.url, config, result):
                _write_batch(batch, f.url, run_id, check, docs, bad, result)
            result.checksum = result.checksum or f.checksum
            results.append(result)
        return TaskResult(key, results, docs.close(), bad.close())
    except BaseException:
        docs.abort()
        bad.abort()
        raise


def _write_batch(batch: ParsedBatch, source_file: str, run_id: str, check, docs: ShardWriter,
                 bad: ShardWriter, result: FileResult) -> None:
    """Quarantine textless records; escape, hash, dedup and write the others."""
    quarantine = list(batch.quarantine)
    n = len(batch.text)
    if n:
        text = escape_texts(batch.text)
        missing = pc.is_null(text)
        textless = pc.fill_null(pc.or_(pc.equal(pc.binary_length(text), 0), pc.utf8_is_space(text)), True)
        has_text = ~textless.to_numpy(zero_copy_only=False)
        digests = _sha1_digests(text)
        hashes = _hex(digests)
        doc_ids = pc.coalesce(batch.doc_id, pc.binary_join_element_wise("sha1:", hashes, ""))
        codes = np.full(n, TEXTLESS, np.uint8)
        codes[has_text] = check(_key64(digests[has_text]), _key64(_sha1_digests(doc_ids))[has_text])
        table = pa.Table.from_arrays([
            doc_ids, text, hashes, batch.source, batch.url, batch.category, batch.metadata,
            pa.array([source_file] * n, pa.string()), pa.array(batch.lines, pa.int64()),
            pa.array([run_id] * n, pa.string()),
        ], schema=DOCUMENT_SCHEMA)
        keep = codes == KEEP
        docs.write(table.filter(pa.array(keep)))
        result.docs_written += int(keep.sum())
        result.duplicates += int((codes == DUPLICATE).sum())
        if not keep.all():
            missing = missing.to_numpy(zero_copy_only=False)
            for j in np.flatnonzero((codes == TEXTLESS) | (codes == DUPLICATE_ID)).tolist():
                if codes[j] == DUPLICATE_ID:
                    reason = f"duplicate_id: {doc_ids[j].as_py()!r} is already the id of a different text"
                else:
                    reason = "missing_text" if missing[j] else "empty_text"
                quarantine.append((int(batch.lines[j]), reason, batch.raw(j)))
    if quarantine:
        quarantine.sort(key=lambda q: -1 if q[0] is None else q[0])
        line_numbers, reasons, raws = zip(*quarantine)
        bad.write(pa.Table.from_arrays([
            pa.array([source_file] * len(quarantine), pa.string()), pa.array(line_numbers, pa.int64()),
            pa.array(reasons, pa.string()), pa.array(raws, pa.binary()),
            pa.array([run_id] * len(quarantine), pa.string()),
        ], schema=QUARANTINE_SCHEMA))
        result.reasons.update(r.split(":", 1)[0] for r in reasons)
    result.quarantined += len(quarantine)
    result.docs_read += batch.records
    result.bytes_read += batch.nbytes


# ---------------------------------------------------------------- running tasks


JobRunner = Callable[..., None]  # runner(work, jobs, on_done=..., callbacks=..., **shared), see run_here


def run_here(work: Callable, jobs: list, *, on_done: Callable, callbacks: dict[str, Callable] | None = None,
             **shared) -> None:
    """The default job runner: every job in this process, in order (``flows.runners.process_pool`` spreads
    them over worker processes with the same call)."""
    for job in jobs:
        on_done(work(job, **shared, **(callbacks or {})))


def ingest_job(job: tuple[list[SourceFile], str], config: IngestConfig, run_id: str, check) -> TaskResult:
    """One ingest task, wherever a runner puts it: ``job`` is (files, task key); ``check`` the shared dedup."""
    files, key = job
    return ingest_files(files, key, config, run_id, check)


# ---------------------------------------------------------------- the stage


def _write_manifest_part(output: str, key: str, lines: list[dict]) -> None:
    fs, root = fs_and_path(output)
    path = posixpath.join(root, "_manifest", f"part-{key}.jsonl")
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = temporary_path(path)
    fs.pipe_file(tmp, b"".join(orjson.dumps(line) + b"\n" for line in lines))
    fs.mv(tmp, path)


def ingest_corpus(config: IngestConfig, run_id: str, progress: Callable[[dict], None] | None = None,
                  runner: JobRunner = run_here) -> IngestReport:
    """Ingest every corpus file named by ``config.inputs`` that is not already in ``config.output``'s
    manifest (see the module docstring for the promises). The files are planned as tasks for
    ``config.workers`` workers and run by ``runner`` (default: in this process; the flows pass a process
    pool); deduplication and the manifest stay in this process. ``progress`` gets the running counts
    about once a second and after each task. Raises :class:`InputError` for inputs that name no corpus file."""
    started = time.perf_counter()
    files = expand_inputs(config.inputs, exclude=config.output)
    fs, root = fs_and_path(config.output)
    fs.makedirs(root, exist_ok=True)
    manifest = read_manifest(config.output)
    remove_orphans(config.output, manifest)
    todo, skipped = files_to_ingest(files, manifest)

    dedup = Deduplicator()
    for shard in sorted({s for e in manifest for s in e["document_shards"]}):
        dedup.remember_shard(posixpath.join(config.output, shard))

    totals: Counter = Counter()  # the report's counts
    reasons: Counter = Counter()
    document_shards, quarantine_shards = [], []
    refreshed = [_manifest_line(f, run_id, "ingested", [], []) | {"skipped": True}
                 for f in skipped if f.checksum]  # same content, new fingerprint: skip quickly next time
    if refreshed:
        _write_manifest_part(config.output, f"{uuid.uuid4().hex[:12]}-refresh", refreshed)
    checked = Counter()
    last_progress = [0.0]

    def report_progress(force: bool = False) -> None:
        now = time.perf_counter() - started
        if progress and (force or now - last_progress[0] >= 1.0):
            last_progress[0] = now
            progress({"files_done": totals["files_ingested"] + totals["files_unreadable"], "files_total": len(todo),
                      "docs_checked": checked["docs"], "docs_kept": checked["kept"], **totals,
                      "seconds": round(now, 3)})

    def check(text_keys: np.ndarray, id_keys: np.ndarray) -> np.ndarray:
        codes = dedup.check(text_keys, id_keys)
        checked.update(docs=len(codes), kept=int((codes == KEEP).sum()))
        report_progress()
        return codes

    def on_done(task: TaskResult) -> None:
        lines = []
        for r in task.files:
            status = "unreadable" if r.unreadable else "ingested"
            lines.append(_manifest_line(r, run_id, status, [_relative(u, config.output) for u in task.document_shards],
                                        [_relative(u, config.output) for u in task.quarantine_shards]))
            totals.update(files_unreadable=int(r.unreadable), files_ingested=int(not r.unreadable),
                          **{k: getattr(r, k) for k in ("docs_read", "docs_written", "duplicates", "quarantined",
                                                        "bytes_read")})
            reasons.update(r.reasons)
        _write_manifest_part(config.output, task.key, lines)  # the commit point of the task
        document_shards.extend(task.document_shards)
        quarantine_shards.extend(task.quarantine_shards)
        report_progress(force=True)

    jobs = [(group, uuid.uuid4().hex[:12]) for group in plan_tasks(todo, config.workers)]
    runner(ingest_job, jobs, on_done=on_done, callbacks={"check": check}, config=config, run_id=run_id)
    return IngestReport(run_id=run_id, output=config.output, files_seen=len(files), files_skipped=len(skipped),
                        **totals, seconds=round(time.perf_counter() - started, 3), document_shards=document_shards,
                        quarantine_shards=quarantine_shards, quarantine_reasons=dict(sorted(reasons.items())))


def _relative(url: str, output: str) -> str:
    """A shard's path relative to the output folder, as the manifest keeps it (the folder may move)."""
    return posixpath.relpath(fs_and_path(url)[1], fs_and_path(output)[1])


def _manifest_line(f, run_id: str, status: str, document_shards: list[str], quarantine_shards: list[str]) -> dict:
    counts = {k: getattr(f, k, 0) for k in ("docs_read", "docs_written", "duplicates", "quarantined", "bytes_read")}
    return {"url": f.url, "size": f.size, "fingerprint": f.fingerprint, "checksum": f.checksum, "status": status,
            "run_id": run_id, **counts, "document_shards": document_shards, "quarantine_shards": quarantine_shards,
            "ingested_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
