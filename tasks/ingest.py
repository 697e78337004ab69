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

import posixpath
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import progress
from schemas.configs import IngestConfig
from schemas.reports import IngestReport
from schemas.shards import DOCUMENT_SCHEMA, QUARANTINE_SCHEMA, SHARD_COMPRESSION
from tasks.ingest_dedup import (
    DUPLICATE,
    DUPLICATE_ID,
    KEEP,
    TEXTLESS,
    Deduplicator,
    escape_texts,
    hex_digests,
    key64,
    sha1_digests,
)
from tasks.ingest_formats import READERS, FileResult, ParsedBatch
from tasks.ingest_plan import (
    SourceFile,
    expand_inputs,
    files_to_ingest,
    kind_of,
    plan_tasks,
    read_manifest,
    remove_orphans,
)
from tasks.shardio import fs_and_path, temporary_path

ROW_GROUP_BYTES = 32 << 20  # rows buffered per shard writer before a Parquet row group is written
_DICTIONARY_COLUMNS = ["source", "category", "source_file", "run_id"]  # few distinct values per shard


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
        digests = sha1_digests(text)
        hashes = hex_digests(digests)
        doc_ids = pc.coalesce(batch.doc_id, pc.binary_join_element_wise("sha1:", hashes, ""))
        codes = np.full(n, TEXTLESS, np.uint8)
        codes[has_text] = check(key64(digests[has_text]), key64(sha1_digests(doc_ids))[has_text])
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


def ingest_corpus(config: IngestConfig, run_id: str, runner: JobRunner = run_here) -> IngestReport:
    """Ingest every corpus file named by ``config.inputs`` that is not already in ``config.output``'s
    manifest (see the module docstring for the promises). The files are planned as tasks for
    ``config.workers`` workers and run by ``runner`` (default: in this process; the flows pass a process
    pool); deduplication and the manifest stay in this process. Progress (files and documents done) goes to
    ``schemas.progress``. Raises :class:`InputError` for inputs that name no corpus file."""
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
    progress.update("ingest: files", 0, len(todo), "files")

    def check(text_keys: np.ndarray, id_keys: np.ndarray) -> np.ndarray:
        codes = dedup.check(text_keys, id_keys)
        checked.update(docs=len(codes), kept=int((codes == KEEP).sum()))
        progress.update("ingest: documents", checked["docs"], None, "docs")
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
        progress.update("ingest: files", totals["files_ingested"] + totals["files_unreadable"], len(todo), "files")

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

