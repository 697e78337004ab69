"""Corpus formats for ingest: JSON lines (plain, gzip, zstd), Parquet and .txt files read into parsed
batches of documents and quarantined records, with bounded memory (see tasks/ingest.py for the promises)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
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

from schemas.configs import IngestConfig
from tasks.ingest_plan import sha256_of
from tasks.shardio import fs_and_path

MAX_RECORD_BYTES = 1 << 28  # a longer line or .txt file is quarantined unread, so memory stays bounded
RAW_BYTES_CAP = 1 << 20  # quarantine keeps at most this much of an offending record
READ_BYTES = 1 << 20  # read granularity: a decompression error loses at most this much before it



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
            result.checksum = sha256_of(url)
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
    result.checksum = sha256_of(url)


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
