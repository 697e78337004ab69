"""Ingestion: corpus files -> document shards, quarantine, dedup, incremental reruns, fsspec URLs."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import fsspec
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from schemas.configs import IngestConfig
from schemas.markup import parse, strip, unescape
from schemas.shards import DOCUMENT_SCHEMA, QUARANTINE_SCHEMA, content_hash
from tasks import ingest, ingest_formats, ingest_plan
from tasks.ingest import IngestReport, ingest_corpus
from tasks.ingest_dedup import KeySet
from tasks.ingest_plan import InputError, read_manifest
from tasks.shardio import list_files, read_table, write_table_atomic


def write_jsonl(path, records, compression: str | None = None) -> str:
    """Records (dicts, or raw bytes for a line as is) as a JSON lines file; returns the path."""
    data = b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in records)
    if compression == "gz":
        data = gzip.compress(data)
    elif compression == "zst":
        data = zstandard.ZstdCompressor().compress(data)
    with fsspec.open(str(path), "wb") as f:
        f.write(data)
    return str(path)


def dolma(i: int, text: str | None = None, **extra) -> dict:
    return {"id": f"doc-{i}", "text": text or f"Document number {i} talks about topic {i * 7}.",
            "source": "wiki", "added": "2024-01-01", "metadata": {"url": f"https://example.org/{i}", "lang": "en"},
            **extra}


def run(inputs, out, **options) -> IngestReport:
    options.setdefault("workers", 1)
    return ingest_corpus(IngestConfig(inputs=[str(i) for i in inputs], output=str(out), **options), "run-1")


def documents(out) -> pa.Table:
    shards = list_files(os.path.join(str(out), "documents"), (".parquet",))
    return pa.concat_tables([read_table(s) for s in shards]) if shards else DOCUMENT_SCHEMA.empty_table()


def quarantine(out) -> list[dict]:
    shards = list_files(os.path.join(str(out), "quarantine"), (".parquet",))
    rows = [r for s in shards for r in read_table(s).to_pylist()]
    return sorted(rows, key=lambda r: (r["source_file"], r["source_line"] or 0))


def test_dolma_jsonl_gz_becomes_document_shards_with_every_field(tmp_path):
    path = write_jsonl(tmp_path / "c4-0000.json.gz",
                       [dolma(1), dolma(2, metadata={"url": "https://a.org/2", "category": "science"}),
                        {"id": 17, "text": "An integer id.", "url": "https://top.org", "category": "sport"}], "gz")
    report = run([path], tmp_path / "out")
    table = documents(tmp_path / "out")
    assert table.schema.equals(DOCUMENT_SCHEMA)
    rows = {r["doc_id"]: r for r in table.to_pylist()}
    assert set(rows) == {"doc-1", "doc-2", "17"}
    first = rows["doc-1"]
    assert first["text"] == dolma(1)["text"]
    assert first["content_hash"] == content_hash(first["text"])
    assert (first["source"], first["url"], first["source_file"], first["source_line"], first["run_id"]) == (
        "wiki", "https://example.org/1", path, 1, "run-1")
    assert json.loads(first["metadata"]) == {"url": "https://example.org/1", "lang": "en"}
    assert rows["doc-2"]["category"] == "science"  # category from metadata (the default category_field)
    assert (rows["17"]["url"], rows["17"]["category"], rows["17"]["source_line"]) == ("https://top.org", "sport", 3)
    assert rows["17"]["metadata"] is None  # no metadata object and no other fields
    assert (report.docs_read, report.docs_written, report.duplicates, report.quarantined) == (3, 3, 0, 0)
    assert report.bytes_read == len(gzip.decompress(open(path, "rb").read()))
    for shard in report.document_shards:
        assert pq.ParquetFile(shard).metadata.row_group(0).column(1).compression == "ZSTD"


def test_records_without_a_metadata_object_keep_their_other_fields_as_metadata(tmp_path):
    path = write_jsonl(tmp_path / "fineweb.jsonl", [{"text": "Some web page.", "dump": "CC-2024", "score": 0.9}])
    run([path], tmp_path / "out")
    row = documents(tmp_path / "out").to_pylist()[0]
    assert json.loads(row["metadata"]) == {"dump": "CC-2024", "score": 0.9}


def test_document_id_is_the_source_id_else_the_content_hash(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"text": "No id here."}, {"id": "", "text": "Empty id."},
                                                {"id": 42, "text": "Integer id."}])
    run([path], tmp_path / "out")
    ids = {r["text"]: r["doc_id"] for r in documents(tmp_path / "out").to_pylist()}
    assert ids == {"No id here.": "sha1:" + content_hash("No id here."),
                   "Empty id.": "sha1:" + content_hash("Empty id."), "Integer id.": "42"}


def test_bad_records_go_to_quarantine_with_their_reason_and_counts_reconcile(tmp_path):
    lines = [dolma(1), b'{"id": "cut", "text": "never closed', b'{"id": "latin1", "text": "caf\xe9"}',
             {"id": "no-text"}, {"id": "null-text", "text": None}, {"id": "empty", "text": ""},
             {"id": "blank", "text": " \n\t "}, b"[1, 2, 3]", {"id": "number", "text": 12},
             {"id": {"nested": 1}, "text": "A dict id."}, b"", dolma(2)]
    path = write_jsonl(tmp_path / "bad.jsonl.gz", lines, "gz")
    report = run([path], tmp_path / "out")
    bad = quarantine(tmp_path / "out")
    reasons = {r["source_line"]: r["reason"].split(":")[0] for r in bad}
    assert reasons == {2: "malformed_json", 3: "invalid_utf8", 4: "missing_text", 5: "missing_text",
                       6: "empty_text", 7: "empty_text", 8: "not_an_object", 9: "missing_text", 10: "bad_id"}
    assert bad[1]["raw"] == b'{"id": "latin1", "text": "caf\xe9"}'  # the offending bytes, for replay
    assert {r["run_id"] for r in bad} == {"run-1"} and {r["source_file"] for r in bad} == {path}
    assert read_table(report.quarantine_shards[0]).schema.equals(QUARANTINE_SCHEMA)
    assert [r["source_line"] for r in documents(tmp_path / "out").to_pylist()] == [1, 12]  # the blank line 11 is no record
    assert (report.docs_read, report.docs_written, report.quarantined) == (11, 2, 9)
    assert report.quarantine_reasons == {"bad_id": 1, "empty_text": 2, "invalid_utf8": 1, "malformed_json": 1,
                                         "missing_text": 3, "not_an_object": 1}
    assert report.docs_read == report.docs_written + report.duplicates + report.quarantined


def test_a_report_that_does_not_reconcile_is_refused():
    with pytest.raises(ValueError, match="read 5 != written 3"):
        IngestReport(run_id="r", output="o", docs_read=5, docs_written=3, duplicates=1)


def test_an_unreadable_file_is_quarantined_and_retried_on_the_next_run(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl.gz", [dolma(i) for i in range(3)], "gz")
    (tmp_path / "corrupt.jsonl.gz").write_bytes(b"this is not gzip at all")
    whole = gzip.compress(b"".join(orjson.dumps(dolma(i)) + b"\n" for i in range(10, 30_000)))  # ~4 MB
    (tmp_path / "truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    report = run([tmp_path], tmp_path / "out")
    assert (report.files_seen, report.files_ingested, report.files_unreadable) == (3, 1, 2)
    bad = [r for r in quarantine(tmp_path / "out") if r["reason"].startswith("unreadable_file")]
    assert sorted(os.path.basename(r["source_file"]) for r in bad) == ["corrupt.jsonl.gz", "truncated.jsonl.gz"]
    assert all(r["source_line"] is None for r in bad)
    written_before = report.docs_written
    assert written_before > 3  # the readable start of the truncated file is kept
    assert report.docs_read == report.docs_written + report.duplicates + report.quarantined

    again = run([tmp_path], tmp_path / "out")
    assert (again.files_skipped, again.files_unreadable) == (1, 2)  # unreadable files are tried again
    assert again.docs_written == 0 and again.duplicates == written_before - 3
    assert good in {e["url"] for e in read_manifest(str(tmp_path / "out")) if e["status"] == "ingested"}


def test_exact_duplicates_are_dropped_within_and_across_files_and_runs(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [dolma(1), dolma(2), dolma(3, text=dolma(1)["text"])])
    b = write_jsonl(tmp_path / "b.jsonl", [dolma(4, text=dolma(2)["text"]), dolma(5)])
    report = run([a, b], tmp_path / "out")
    assert (report.docs_written, report.duplicates) == (3, 2)
    assert sorted(documents(tmp_path / "out")["doc_id"].to_pylist()) == ["doc-1", "doc-2", "doc-5"]
    c = write_jsonl(tmp_path / "c.jsonl", [dolma(6, text=dolma(5)["text"]), dolma(7)])
    later = run([a, b, c], tmp_path / "out")
    assert (later.files_skipped, later.docs_written, later.duplicates) == (2, 1, 1)
    table = documents(tmp_path / "out")
    assert sorted(table["doc_id"].to_pylist()) == ["doc-1", "doc-2", "doc-5", "doc-7"]
    assert len(set(table["content_hash"].to_pylist())) == table.num_rows


def test_a_reused_id_with_a_different_text_is_quarantined_not_overwritten(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [dolma(1), dolma(1, text="Another text under the same id.")])
    report = run([path], tmp_path / "out")
    assert report.quarantine_reasons == {"duplicate_id": 1}
    assert documents(tmp_path / "out")["text"].to_pylist() == [dolma(1)["text"]]
    assert quarantine(tmp_path / "out")[0]["source_line"] == 2
    later = write_jsonl(tmp_path / "b.jsonl", [dolma(1, text="Yet another text, next run.")])
    assert run([path, later], tmp_path / "out").quarantine_reasons == {"duplicate_id": 1}


def test_rerun_skips_files_with_the_same_checksum_and_ingests_changed_ones(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    a = write_jsonl(corpus / "a.jsonl.gz", [dolma(i) for i in range(5)], "gz")
    write_jsonl(corpus / "b.jsonl.gz", [dolma(i) for i in range(5, 9)], "gz")
    first = run([corpus], tmp_path / "out")
    assert (first.files_ingested, first.docs_written) == (2, 9)

    second = run([corpus], tmp_path / "out")
    assert (second.files_skipped, second.files_ingested, second.docs_read) == (2, 0, 0)

    os.utime(a, (1_000_000, 1_000_000))  # touched: new mtime, same bytes -> skipped by checksum
    touched = run([corpus], tmp_path / "out")
    assert (touched.files_skipped, touched.docs_read) == (2, 0)

    write_jsonl(corpus / "a.jsonl.gz", [dolma(i) for i in range(5)] + [dolma(20)], "gz")  # changed: one more
    changed = run([corpus], tmp_path / "out")
    assert (changed.files_ingested, changed.files_skipped) == (1, 1)
    assert (changed.docs_written, changed.duplicates) == (1, 5)
    assert documents(tmp_path / "out").num_rows == 10
    manifest = read_manifest(str(tmp_path / "out"))
    assert {e["checksum"][:7] for e in manifest} == {"sha256:"} and {e["run_id"] for e in manifest} == {"run-1"}


def test_literal_special_tokens_are_escaped_and_never_become_lookups(tmp_path):
    literal = ("A tutorial shows <|db_entity|> Napoleon<|db_relationship|> birthplace<|db_return|> Ajaccio"
               "<|db_end|> and the legacy [dblookup('Napoleon', 'birthplace') -> Ajaccio] form.")
    path = write_jsonl(tmp_path / "tokens.jsonl", [dolma(1, text=literal), dolma(2)])
    run([path], tmp_path / "out")
    rows = {r["doc_id"]: r for r in documents(tmp_path / "out").to_pylist()}
    stored = rows["doc-1"]["text"]
    assert stored != literal and unescape(stored) == literal
    assert parse(stored).calls == () and strip(stored) == stored
    assert rows["doc-1"]["content_hash"] == content_hash(stored)
    assert rows["doc-2"]["text"] == dolma(2)["text"]  # texts without markup are stored as they are


def test_memory_urls_for_inputs_and_outputs(tmp_path):
    root = f"memory://ingest-{uuid.uuid4().hex}"
    write_jsonl(f"{root}/corpus/a.jsonl.zst", [dolma(1), dolma(2)], "zst")
    write_jsonl(f"{root}/corpus/sub/b.jsonl", [dolma(3), b"{not json"])
    report = run([f"{root}/corpus"], f"{root}/shards")
    assert (report.docs_written, report.quarantined) == (3, 1)
    assert all(s.startswith("memory://") for s in report.document_shards + report.quarantine_shards)
    assert sorted(documents(f"{root}/shards")["doc_id"].to_pylist()) == ["doc-1", "doc-2", "doc-3"]
    assert {r["source_file"] for r in documents(f"{root}/shards").to_pylist()} == {
        f"memory:///ingest-{root.split('-', 1)[1]}/corpus/a.jsonl.zst",
        f"memory:///ingest-{root.split('-', 1)[1]}/corpus/sub/b.jsonl"}
    assert run([f"{root}/corpus"], f"{root}/shards").files_skipped == 2


def test_file_urls_and_glob_patterns(tmp_path):
    write_jsonl(tmp_path / "part-0.jsonl", [dolma(1)])
    write_jsonl(tmp_path / "part-1.jsonl", [dolma(2)])
    write_jsonl(tmp_path / "other.jsonl", [dolma(3)])
    report = run([f"file://{tmp_path}/part-*.jsonl"], f"file://{tmp_path}/out")
    assert report.files_seen == 2 and report.document_shards[0].startswith("file://")
    assert sorted(documents(tmp_path / "out")["doc_id"].to_pylist()) == ["doc-1", "doc-2"]


def test_parquet_input_with_a_text_column(tmp_path):
    table = pa.table({"id": [1, 2, 3, 4], "text": ["First row.", None, "Third row.", "  "],
                      "url": ["u1", "u2", "u3", "u4"], "dump": ["CC", "CC", "CC", "CC"]})
    pq.write_table(table, tmp_path / "train-00000.parquet")
    report = run([tmp_path / "train-00000.parquet"], tmp_path / "out")
    rows = documents(tmp_path / "out").to_pylist()
    assert [(r["doc_id"], r["text"], r["url"], r["source_line"]) for r in rows] == [
        ("1", "First row.", "u1", 1), ("3", "Third row.", "u3", 3)]
    assert json.loads(rows[0]["metadata"]) == {"dump": "CC"}
    assert {r["source_line"]: r["reason"] for r in quarantine(tmp_path / "out")} == {2: "missing_text", 4: "empty_text"}
    assert report.docs_read == 4


def test_parquet_without_the_text_column_is_quarantined_as_one_record(tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "wrong.parquet")
    report = run([tmp_path / "wrong.parquet"], tmp_path / "out")
    assert (report.files_unreadable, report.quarantined) == (1, 1)
    assert "no column 'text'" in quarantine(tmp_path / "out")[0]["reason"]
    assert run([tmp_path / "wrong.parquet"], tmp_path / "out2", text_field="content").docs_written == 1


def test_txt_folder_gives_one_document_per_file(tmp_path):
    folder = tmp_path / "books"
    (folder / "nested").mkdir(parents=True)
    (folder / "one.txt").write_text("The first book.\nSecond line.\n")
    (folder / "nested" / "two.txt").write_text("The second book.")
    (folder / "empty.txt").write_text("   \n")
    (folder / "latin1.txt").write_bytes("café".encode("latin-1"))
    report = run([folder], tmp_path / "out")
    rows = {r["text"]: r for r in documents(tmp_path / "out").to_pylist()}
    assert set(rows) == {"The first book.\nSecond line.\n", "The second book."}
    assert rows["The second book."]["doc_id"] == "sha1:" + content_hash("The second book.")
    assert {os.path.basename(r["source_file"]): r["reason"].split(":")[0] for r in quarantine(tmp_path / "out")} == {
        "empty.txt": "empty_text", "latin1.txt": "invalid_utf8"}
    assert (report.docs_read, report.docs_written, report.quarantined) == (4, 2, 2)


def test_inputs_that_name_no_corpus_file_raise_one_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"'.*nowhere' does not exist: pass an existing file, folder or glob"):
        run([tmp_path / "nowhere"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="matches no corpus file"):
        run([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="is not a corpus file"):
        run([tmp_path / "notes.csv"], tmp_path / "out")
    assert issubclass(InputError, ValueError)


def test_shards_hold_at_most_shard_docs_documents(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [dolma(i) for i in range(10)])
    report = run([path], tmp_path / "out", shard_docs=3)
    sizes = [pq.ParquetFile(s).metadata.num_rows for s in report.document_shards]
    assert sizes == [3, 3, 3, 1]


def test_small_batches_keep_line_numbers_across_block_boundaries(tmp_path):
    records = [dolma(i, text=f"Document {i} " + "padding " * (i % 50)) for i in range(3000)]
    records[1234] = b"{broken"
    path = write_jsonl(tmp_path / "a.jsonl.gz", records, "gz")
    run([path], tmp_path / "out", batch_bytes=1 << 16)
    lines = documents(tmp_path / "out")["source_line"].to_pylist()
    assert sorted(lines) == [n for n in range(1, 3001) if n != 1235]
    assert [r["source_line"] for r in quarantine(tmp_path / "out")] == [1235]


def test_a_line_longer_than_the_record_limit_is_quarantined_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_formats, "MAX_RECORD_BYTES", 200_000)
    path = write_jsonl(tmp_path / "a.jsonl", [dolma(1), dolma(2, text="x" * 300_000), dolma(3)])
    report = run([path], tmp_path / "out", batch_bytes=1 << 16)
    assert sorted(documents(tmp_path / "out")["source_line"].to_pylist()) == [1, 3]
    bad = quarantine(tmp_path / "out")
    assert [(r["source_line"], r["reason"].split(":")[0]) for r in bad] == [(2, "record_too_large")]
    assert report.docs_read == 3


def test_a_crash_before_the_manifest_leaves_nothing_duplicated(tmp_path, monkeypatch):
    a = write_jsonl(tmp_path / "a.jsonl", [dolma(i) for i in range(4)])
    crash = RuntimeError("killed")

    def crash_on_commit(*args):
        raise crash

    monkeypatch.setattr(ingest, "_write_manifest_part", crash_on_commit)
    with pytest.raises(RuntimeError, match="killed"):
        run([a], tmp_path / "out", shard_docs=2)
    assert len(list_files(str(tmp_path / "out" / "documents"), (".parquet",))) == 2  # finished, unrecorded
    (tmp_path / "out" / "documents" / "part-x-00000.parquet.abc.tmp").write_bytes(b"half a shard")
    monkeypatch.undo()

    report = run([a], tmp_path / "out", shard_docs=2)
    assert (report.files_ingested, report.docs_written, report.duplicates) == (1, 4, 0)
    table = documents(tmp_path / "out")
    assert sorted(table["doc_id"].to_pylist()) == [f"doc-{i}" for i in range(4)]
    assert sorted(os.listdir(tmp_path / "out" / "documents")) == sorted(
        os.path.basename(s) for s in report.document_shards)


def test_other_files_in_the_output_folder_are_left_alone(tmp_path):
    out = tmp_path / "out"
    write_table_atomic(pa.table({"x": [1]}), str(out / "documents" / "mine.parquet"))
    run([write_jsonl(tmp_path / "a.jsonl", [dolma(1)])], out)
    assert (out / "documents" / "mine.parquet").exists()


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_worker_processes_share_one_dedup(tmp_path, monkeypatch, start):
    monkeypatch.setattr(ingest_plan, "MIN_TASK_BYTES", 1)  # every file its own task, so both workers get work
    if start == "spawn":  # what a Prefect task gets: another thread is running, so workers are spawned
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
    shared = "The same text in every file."
    for f in range(4):
        write_jsonl(tmp_path / f"part-{f}.jsonl.gz",
                    [dolma(100 * f + i) for i in range(50)] + [dolma(1000 + f, text=shared)], "gz")
    from flows.runners import process_pool

    report = ingest_corpus(IngestConfig(inputs=[str(tmp_path)], output=str(tmp_path / "out"), workers=2), "run-1",
                           runner=process_pool(2))
    assert (report.docs_read, report.docs_written, report.duplicates) == (204, 201, 3)
    assert len(report.document_shards) == 4
    table = documents(tmp_path / "out")
    assert table.num_rows == 201 and len(set(table["doc_id"].to_pylist())) == 201
    if start == "spawn":
        stop.set()


def test_progress_reports_files_and_documents_done(tmp_path):
    from schemas import progress

    seen = []
    run([write_jsonl(tmp_path / "a.jsonl", [dolma(1), dolma(2)])], tmp_path / "out", shard_docs=1)
    with progress.listening(lambda *update: seen.append(update)):
        run([write_jsonl(tmp_path / "b.jsonl", [dolma(3), dolma(4)]), write_jsonl(tmp_path / "c.jsonl", [dolma(5)])],
            tmp_path / "out")
    files = [s for s in seen if s[0] == "ingest: files"]
    assert files[0][1:] == (0, 2, "files") and files[-1][1:] == (2, 2, "files")  # the earlier file is not counted
    assert [s for s in seen if s[0] == "ingest: documents"][-1][1] == 3


def test_keyset_agrees_with_a_python_set_through_growth():
    rng = np.random.default_rng(0)
    keys = KeySet(capacity=16)
    reference: set[int] = set()
    for _ in range(30):
        batch = np.unique(rng.integers(1, 2**63, size=int(rng.integers(1, 3000)), dtype=np.uint64))
        batch[: len(batch) // 4] = rng.choice(np.array(sorted(reference) or [1], np.uint64), len(batch) // 4)
        batch = np.unique(batch)
        expected = np.array([int(k) in reference for k in batch])
        assert (keys.contains(batch) == expected).all()
        keys.add(batch[~expected])
        reference.update(int(k) for k in batch)
        assert len(keys) == len(reference)


def test_the_prefect_task_spreads_ingest_over_worker_processes_and_the_stage_needs_no_prefect():
    from flows.stages import ingest, ingest_task

    assert ingest_task.name == "ingest" and ingest_task.fn is ingest
    code = "import sys, tasks.ingest; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"
