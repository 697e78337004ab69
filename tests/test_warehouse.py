"""The DuckDB warehouse: idempotent loading, the views a data engineer uses, edits and aliases with
their audit log, the lookup-database export/import, safe ad-hoc SQL, and the stock CLI reading it."""

import csv
import io
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import fsspec
import orjson
import pyarrow.parquet as pq
import pytest

from schemas.shards import (
    ANNOTATED_SCHEMA,
    DOCUMENT_SCHEMA,
    TRIPLET_SCHEMA,
    content_hash,
    rows_to_table,
    triplet_id,
)
from warehouse.db import (
    KEYS,
    WarehouseError,
    connect,
    load_annotated,
    load_documents,
    load_triplets,
    record_run,
    run_sql,
    stats,
    table_checksum,
)
from warehouse.edits import edit_fact, set_alias
from warehouse.lookup_db import export_lookup_db, import_reference_db

PROJECT = Path(__file__).resolve().parents[1]
REFERENCE_DB = PROJECT.parent / "shared" / "data" / "lmlm-reference" / "database_dwiki_eval100.json"

TEXTS = {
    "d1": "Ada Lovelace was born in Lôndon and wrote notes on the Analytical Engine.",
    "d2": "Lovelace, born in London, worked with Charles Babbage.",
    "d3": "Ada Lovelace was born in Paris, says one doubtful source.",
}


def doc(doc_id, run_id="ingest-1"):
    text = TEXTS[doc_id]
    return dict(doc_id=doc_id, text=text, content_hash=content_hash(text), source="test",
                url=f"https://example.org/{doc_id}", source_file="corpus.jsonl", source_line=int(doc_id[1:]),
                run_id=run_id)


def trip(doc_id, entity, relation, value, mention=None, annotator="gold", run_id="annotate-1", confidence=None):
    """A triplet row whose value span points at ``mention`` (default: the value) in the document text."""
    text = TEXTS[doc_id]
    start = text.find(mention or value)
    span = (start, start + len(mention or value)) if start >= 0 else (None, None)
    offset = max(start, 0)
    return dict(triplet_id=triplet_id(doc_id, offset, entity, relation, value, annotator), doc_id=doc_id,
                entity=entity, relation=relation, value=value, call_offset=offset, value_start=span[0],
                value_end=span[1], source_url=f"https://example.org/{doc_id}", annotator=annotator,
                annotator_version="1", run_id=run_id, confidence=confidence)


def write_shard(path, rows, schema=TRIPLET_SCHEMA):
    pq.write_table(rows_to_table(rows, schema), path, compression="zstd")
    return str(path)


TRIPLETS = [
    trip("d1", "Ada Lovelace", "birthplace", "London", mention="Lôndon", confidence=0.9),
    trip("d1", "Ada Lovelace", "known for", "Analytical Engine"),
    trip("d2", "Lovelace", "birthplace", "London", confidence=0.8),
    trip("d2", "Lovelace", "collaborator", "Charles Babbage"),
    trip("d3", "Ada Lovelace", "born in", "Paris"),
]


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "warehouse.duckdb")


@pytest.fixture
def con(path):
    c = connect(path)
    yield c
    c.close()


@pytest.fixture
def shards(tmp_path):
    """Document, annotated and two triplet shards of the three documents."""
    docs = write_shard(tmp_path / "documents-0.parquet", [doc(d) for d in TEXTS], DOCUMENT_SCHEMA)
    annotated = write_shard(tmp_path / "annotated-0.parquet", [
        dict(doc_id=d, text=t, annotated_text=t, n_calls=0, text_version=0, annotator="gold",
             annotator_version="1", run_id="annotate-1") for d, t in TEXTS.items()
    ], ANNOTATED_SCHEMA)
    triplets = [write_shard(tmp_path / "triplets-0.parquet", TRIPLETS[:3]),
                write_shard(tmp_path / "triplets-1.parquet", TRIPLETS[3:])]
    return {"documents": [docs], "annotated": [annotated], "triplets": triplets}


def load_all(con, shards, run_id="load-1"):
    return (load_documents(con, shards["documents"], run_id),
            load_annotated(con, shards["annotated"], run_id),
            load_triplets(con, shards["triplets"], run_id))


def rows(con, sql, params=None):
    return con.execute(sql, params or []).fetchall()


def facts(con):
    return {(e, r): v for e, r, v in rows(con, "SELECT entity, relation, list(value ORDER BY value) FROM facts GROUP BY ALL")}


# --------------------------------------------------------------------------- loading


def test_loading_the_same_shards_twice_leaves_identical_content(con, shards):
    first = load_all(con, shards)
    sums = {t: table_checksum(con, t) for t in ("documents", "annotations", "triplets", "relations")}
    second = load_all(con, shards, run_id="load-2")
    assert {t: table_checksum(con, t) for t in sums} == sums
    assert [r["inserted"] for r in first] == [3, 3, 5]
    assert [(r["inserted"], r["replaced"], r["unchanged"]) for r in second] == [(0, 0, 3), (0, 0, 3), (0, 0, 5)]
    for table, key in KEYS.items():
        n, n_keys = rows(con, f"SELECT count(*), count(DISTINCT row({', '.join(key)})) FROM {table}")[0]
        assert n == n_keys, table
    # lineage: both loads of each shard are recorded
    assert rows(con, "SELECT count(*) FROM shard_loads WHERE table_name = 'triplets'")[0][0] == 4


def test_reloading_a_changed_shard_replaces_rows_and_the_later_duplicate_row_wins(con, tmp_path):
    load_triplets(con, [write_shard(tmp_path / "a.parquet", TRIPLETS)], "load-1")
    changed = dict(TRIPLETS[0], confidence=0.5, run_id="annotate-2")
    later = dict(TRIPLETS[0], confidence=0.25, run_id="annotate-3")
    result = load_triplets(con, [write_shard(tmp_path / "b.parquet", [changed, later])], "load-2")
    assert (result["duplicate_keys"], result["replaced"], result["inserted"]) == (1, 1, 0)
    assert rows(con, "SELECT confidence, run_id FROM triplets WHERE triplet_id = ?", [TRIPLETS[0]["triplet_id"]]) == [
        (0.25, "annotate-3")]
    assert rows(con, "SELECT count(*) FROM triplets")[0][0] == len(TRIPLETS)


def test_memory_url_shards_load_and_the_last_duplicate_wins(con):
    fs = fsspec.filesystem("memory")
    urls = ["memory://warehouse-test/triplets-0.parquet", "memory://warehouse-test/triplets-1.parquet"]
    for url, shard in zip(urls, [TRIPLETS, [dict(TRIPLETS[0], confidence=0.125)]]):
        with fs.open(url, "wb") as f:
            pq.write_table(rows_to_table(shard, TRIPLET_SCHEMA), f)
    result = load_triplets(con, urls, "load-1")
    assert (result["inserted"], result["duplicate_keys"]) == (len(TRIPLETS), 1)
    assert sorted(r[0] for r in rows(con, "SELECT triplet_id FROM triplets")) == sorted(
        t["triplet_id"] for t in TRIPLETS)
    assert rows(con, "SELECT confidence FROM triplets WHERE triplet_id = ?", [TRIPLETS[0]["triplet_id"]]) == [(0.125,)]


def test_bad_shards_fail_with_one_line_naming_the_shard_and_load_nothing(con, tmp_path, shards):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(WarehouseError, match="nope.parquet not found"):
        load_triplets(con, [missing], "load-1")
    with pytest.raises(WarehouseError, match=r"documents-0.parquet lacks columns \['triplet_id'"):
        load_triplets(con, shards["documents"], "load-1")
    import pyarrow as pa  # a shard written without the schema's non-null guarantees
    loose = pa.schema([f.with_nullable(True) for f in TRIPLET_SCHEMA])
    null_entity = write_shard(tmp_path / "null.parquet", [dict(TRIPLETS[0], entity=None)], loose)
    with pytest.raises(WarehouseError, match="null.parquet: column entity has 1 null"):
        load_triplets(con, [null_entity], "load-1")
    bad_span = write_shard(tmp_path / "span.parquet", [TRIPLETS[1], dict(TRIPLETS[0], value_start=9, value_end=3)])
    with pytest.raises(WarehouseError, match="span.parquet.*do not fit") as e:
        load_triplets(con, [bad_span], "load-1")
    assert "\n" not in str(e.value)
    assert rows(con, "SELECT count(*) FROM triplets")[0][0] == 0  # the good row was rolled back too
    assert rows(con, "SELECT count(*) FROM shard_loads")[0][0] == 0


def test_record_run_upserts_and_keeps_the_start_time(con):
    record_run(con, "r1", "corpus", {"seed": 0}, ["corpus.jsonl"], "abc123", "RUNNING")
    started = rows(con, "SELECT started_at FROM runs")[0][0]
    record_run(con, "r1", "corpus", {"seed": 0}, ["corpus.jsonl"], "abc123", "COMPLETED", counts={"docs": 3})
    assert rows(con, "SELECT status, started_at, json_extract(counts, '$.docs')::INT, inputs FROM runs") == [
        ("COMPLETED", started, 3, ["corpus.jsonl"])]


# --------------------------------------------------------------------------- views


def test_facts_deduplicate_across_documents_with_sources(con, shards):
    load_all(con, shards)
    london = rows(con, "SELECT n_sources, n_triplets, doc_ids, source_urls, max_confidence, provenance FROM facts "
                       "WHERE entity = 'Ada Lovelace' AND relation = 'birthplace' AND value = 'London'")
    # 'Lovelace' is not (yet) an alias, so only d1 supports this fact
    assert london == [(1, 1, ["d1"], ["https://example.org/d1"], pytest.approx(0.9), "observed")]
    assert rows(con, "SELECT count(*) FROM facts")[0][0] == len({(t["entity"], t["relation"], t["value"]) for t in TRIPLETS})


def test_conflicts_and_relation_stats_follow_aliases(con, shards):
    load_all(con, shards)
    assert rows(con, "SELECT count(*) FROM conflicts")[0][0] == 0
    set_alias(con, "entity", "Lovelace", "Ada Lovelace", reason="same person")
    set_alias(con, "relation", "born in", "birthplace", reason="same relation")
    assert rows(con, "SELECT entity, relation, candidate_values, candidate_sources FROM conflicts") == [
        ("Ada Lovelace", "birthplace", ["London", "Paris"], [2, 1])]
    stats = {r[0]: r[1:] for r in rows(con, "SELECT relation, n_triplets, n_entities, n_values, n_docs, "
                                            "n_surface_forms, n_facts, n_conflicts FROM relation_stats")}
    assert stats["birthplace"] == (3, 1, 2, 3, 2, 2, 1)
    assert stats["collaborator"] == (1, 1, 1, 1, 1, 1, 0)
    assert "born in" not in stats  # an alias is not part of the vocabulary
    assert "born in" not in {r[0] for r in rows(con, "SELECT relation FROM relations")}


def test_triplet_sources_ground_each_triplet_in_its_document_and_run(con, shards):
    load_all(con, shards)
    record_run(con, "annotate-1", "corpus", {}, ["corpus.jsonl"], "abc123", "COMPLETED")
    got = rows(con, "SELECT value, value_mention, source_url, run_flow, run_code_version, document_run_id "
                    "FROM triplet_sources WHERE doc_id = 'd1' AND relation = 'birthplace'")
    assert got == [("London", "Lôndon", "https://example.org/d1", "corpus", "abc123", "ingest-1")]


# --------------------------------------------------------------------------- edits and aliases


def test_edit_sets_and_deletes_facts_over_unchanged_triplets_with_audit(con, shards):
    load_all(con, shards)
    triplets_before = table_checksum(con, "triplets")
    set_id = edit_fact(con, "Ada Lovelace", "born in", "London", reason="Paris is wrong", user="ana")
    assert facts(con)[("Ada Lovelace", "born in")] == ["London"]
    assert rows(con, "SELECT provenance, edit_audit_id, edited_by, edit_reason FROM facts "
                     "WHERE relation = 'born in'") == [("edit", set_id, "ana", "Paris is wrong")]
    delete_id = edit_fact(con, "Lovelace", "collaborator", None, reason="out of scope", user="ana")
    assert ("Lovelace", "collaborator") not in facts(con)
    assert table_checksum(con, "triplets") == triplets_before
    audit = rows(con, "SELECT audit_id, action, entity, relation, old_value, new_value, reason, actor "
                      "FROM audit_log ORDER BY audit_id")
    assert audit == [
        (set_id, "set_fact", "Ada Lovelace", "born in", '["Paris"]', "London", "Paris is wrong", "ana"),
        (delete_id, "delete_fact", "Lovelace", "collaborator", '["Charles Babbage"]', None, "out of scope", "ana"),
    ]
    load_all(con, shards, run_id="load-2")  # reloading shards keeps the edits
    assert facts(con)[("Ada Lovelace", "born in")] == ["London"] and ("Lovelace", "collaborator") not in facts(con)


def test_edit_resolves_a_conflict_and_keeps_the_sources_that_agree(con, shards):
    load_all(con, shards)
    set_alias(con, "relation", "born in", "birthplace", reason="same relation")
    assert rows(con, "SELECT count(*) FROM conflicts")[0][0] == 1
    edit_fact(con, "Ada Lovelace", "born in", "London", reason="checked", user="ana")  # alias edits canonical
    assert rows(con, "SELECT count(*) FROM conflicts")[0][0] == 0
    assert rows(con, "SELECT relation, value, n_sources, doc_ids, provenance FROM facts "
                     "WHERE entity = 'Ada Lovelace' AND relation = 'birthplace'") == [
        ("birthplace", "London", 1, ["d1"], "edit")]


def test_edit_refuses_bad_requests(con, shards):
    load_all(con, shards)
    with pytest.raises(WarehouseError, match="no fact .* to delete"):
        edit_fact(con, "Nobody", "birthplace", None, reason="x")
    with pytest.raises(WarehouseError, match="reason"):
        edit_fact(con, "Ada Lovelace", "birthplace", "Paris", reason=" ")
    with pytest.raises(WarehouseError, match="value"):
        edit_fact(con, "Ada Lovelace", "birthplace", " Paris", reason="x")
    assert rows(con, "SELECT count(*) FROM audit_log")[0][0] == 0


def test_a_person_overrides_a_corrector_alias_and_the_corrector_cannot_undo_it(con, shards):
    load_all(con, shards)
    assert set_alias(con, "entity", "Lovelace", "Ada Lovelace", reason="proposed", source="corrector", user="fixer-1")
    assert facts(con)[("Ada Lovelace", "collaborator")] == ["Charles Babbage"]
    assert rows(con, "SELECT reviewed FROM entity_aliases WHERE alias = 'Lovelace'") == [(False,)]
    rejected = set_alias(con, "entity", "Lovelace", "Lovelace", reason="could be Byron's daughter or not", user="ana")
    assert ("Lovelace", "collaborator") in facts(con) and ("Ada Lovelace", "collaborator") not in facts(con)
    assert set_alias(con, "entity", "Lovelace", "Ada Lovelace", reason="again", source="corrector") is None
    assert ("Lovelace", "collaborator") in facts(con)
    assert rows(con, "SELECT action, alias, old_value, new_value FROM audit_log WHERE audit_id = ?", [rejected]) == [
        ("set_entity_alias", "Lovelace", "Ada Lovelace", "Lovelace")]


def test_aliases_stay_one_hop_deep(con, shards):
    load_all(con, shards)
    set_alias(con, "entity", "Lovelace", "Ada Lovelace", reason="r")
    set_alias(con, "entity", "Ada Lovelace", "Augusta Ada King", reason="full name")
    assert rows(con, "SELECT alias, entity FROM entity_aliases ORDER BY alias") == [
        ("Ada Lovelace", "Augusta Ada King"), ("Lovelace", "Augusta Ada King")]
    assert {e for e, _ in facts(con)} == {"Augusta Ada King"}


# --------------------------------------------------------------------------- lookup database


def test_export_writes_the_reference_format_and_reimports_to_the_same_facts(con, shards, tmp_path):
    load_all(con, shards)
    edit_fact(con, "Ada Lovelace", "born in", None, reason="doubtful", user="ana")
    result = export_lookup_db(con, str(tmp_path / "db.json"), str(tmp_path / "db.parquet"))
    exported = json.loads((tmp_path / "db.json").read_text(encoding="utf-8"))
    assert set(exported) == {"entities", "relationships", "return_values", "triplets"}
    expected = sorted((t["entity"], t["relation"], t["value"]) for t in TRIPLETS if t["relation"] != "born in")
    expected = sorted(set(expected))
    assert [tuple(t) for t in exported["triplets"]] == expected
    assert exported["entities"] == sorted({t[0] for t in expected})
    assert exported["relationships"] == sorted({t[1] for t in expected})
    assert exported["return_values"] == sorted({t[2] for t in expected})
    table = pq.read_table(tmp_path / "db.parquet")
    assert table.column_names == ["entity", "relation", "value", "n_sources", "sources", "source_urls", "provenance"]
    assert table.num_rows == result["facts"] == len(expected)

    with connect(tmp_path / "copy.duckdb") as copy:
        imported = import_reference_db(copy, str(tmp_path / "db.json"), "import-1")
        assert imported["inserted"] == len(expected)
        export_lookup_db(copy, str(tmp_path / "again.json"))
        assert rows(copy, "SELECT DISTINCT doc_id, annotator, value_start FROM triplets") == [
            ("import:db.json", "reference-import", None)]
        assert rows(copy, "SELECT flow, status FROM runs WHERE run_id = 'import-1'") == [
            ("import_reference_db", "COMPLETED")]
    assert json.loads((tmp_path / "again.json").read_text(encoding="utf-8")) == exported


def test_reimporting_a_changed_file_replaces_its_triplets(con, tmp_path):
    db = tmp_path / "db.json"
    db.write_bytes(orjson.dumps({"triplets": [["A", "r", "1"], ["B", "r", "2"]]}))
    import_reference_db(con, str(db), "import-1")
    checksum = table_checksum(con, "triplets")
    assert import_reference_db(con, str(db), "import-1")["inserted"] == 0
    assert table_checksum(con, "triplets") == checksum
    db.write_bytes(orjson.dumps({"triplets": [["B", "r", "2"], ["C", "r", "3"]]}))
    import_reference_db(con, str(db), "import-2")
    assert sorted(facts(con)) == [("B", "r"), ("C", "r")]


def test_import_rejects_malformed_databases_naming_the_entry(con, tmp_path):
    db = tmp_path / "db.json"
    db.write_text('{"triplets": [["A", "r", "1"], ["B", "r"]]}')
    with pytest.raises(WarehouseError, match=r"db.json: triplets\[1\] must be"):
        import_reference_db(con, str(db), "import-1")
    db.write_text("{not json")
    with pytest.raises(WarehouseError, match="not valid JSON"):
        import_reference_db(con, str(db), "import-1")
    assert rows(con, "SELECT count(*) FROM triplets")[0][0] == 0


@pytest.mark.skipif(not REFERENCE_DB.exists(), reason="reference data (../shared/data/lmlm-reference) absent")
def test_import_of_the_reference_database(con, tmp_path):
    triplets = json.loads(REFERENCE_DB.read_text(encoding="utf-8"))["triplets"]
    result = import_reference_db(con, str(REFERENCE_DB), "import-1")
    assert result["rows"] == len(triplets)
    assert {tuple(r) for r in rows(con, "SELECT entity, relation, value FROM facts")} == {tuple(t) for t in triplets}
    values = defaultdict(set)
    for e, r, v in triplets:
        values[(e, r)].add(v)
    assert rows(con, "SELECT count(*) FROM conflicts")[0][0] == sum(len(v) > 1 for v in values.values())
    export_lookup_db(con, str(tmp_path / "out.json"))
    out = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert sorted(map(tuple, out["triplets"])) == sorted({tuple(t) for t in triplets})


# --------------------------------------------------------------------------- access


def stock_cli():
    """The duckdb CLI from the duckdb-cli package: next to this Python, else on PATH."""
    candidate = Path(sys.executable).parent / "duckdb"
    return str(candidate) if candidate.exists() else shutil.which("duckdb")


@pytest.mark.skipif(stock_cli() is None, reason="duckdb CLI (PyPI duckdb-cli) not installed")
def test_the_stock_duckdb_cli_reads_the_warehouse_and_every_view(path, shards):
    with connect(path) as con:
        load_all(con, shards)
        set_alias(con, "relation", "born in", "birthplace", reason="same")
        edit_fact(con, "Lovelace", "collaborator", "C. Babbage", reason="style", user="ana")
    for view in ("facts", "conflicts", "relation_stats", "triplet_sources", "canonical_triplets", "observed_facts"):
        out = subprocess.run([stock_cli(), path, "-csv", "-c", f"select count(*) from {view}"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert int(list(csv.reader(io.StringIO(out.stdout)))[1][0]) > 0, view


def test_run_sql_is_read_only_unless_asked_and_binds_parameters(path, shards, tmp_path):
    with connect(path) as con:
        load_all(con, shards)
    with pytest.raises(WarehouseError, match="read-only.*write=True"):
        run_sql(path, "DELETE FROM triplets")
    with pytest.raises(WarehouseError, match="write=True"):
        run_sql(path, f"COPY triplets TO '{tmp_path / 'leak.csv'}'")
    assert not (tmp_path / "leak.csv").exists()
    hostile = "Ada Lovelace'; DELETE FROM triplets; --"
    assert run_sql(path, "SELECT count(*) AS n FROM facts WHERE entity = ?", [hostile]) == (["n"], [(0,)])
    columns, got = run_sql(path, "SELECT value FROM facts WHERE entity = $e AND relation = $r",
                              {"e": "Ada Lovelace", "r": "known for"})
    assert (columns, got) == (["value"], [("Analytical Engine",)])
    run_sql(path, "DELETE FROM triplets WHERE doc_id = ?", ["d3"], write=True)
    assert run_sql(path, "SELECT count(*) FROM triplets")[1] == [(len(TRIPLETS) - 1,)]
    with pytest.raises(WarehouseError, match="query failed: .*no_such_table"):
        run_sql(path, "SELECT * FROM no_such_table")


def test_a_second_writer_gets_a_clear_busy_error(path):
    with pytest.raises(WarehouseError, match="does not exist"):
        connect(path, read_only=True)  # a reader never creates the file
    with connect(path):
        code = (
            "import sys\nfrom warehouse.db import WarehouseBusyError, connect\n"
            "try:\n    connect(sys.argv[1])\nexcept WarehouseBusyError as e:\n    print(e)\n"
        )
        out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60,
                             cwd=PROJECT)
    assert "is open for writing by another process" in out.stdout, out.stderr
    with connect(path, read_only=True) as again:  # lock released on close
        assert again.execute("SELECT count(*) FROM triplets").fetchone() == (0,)


def test_stats_count_rows_facts_and_runs(con, shards):
    load_all(con, shards)
    record_run(con, "load-1", "load", {}, shards["triplets"], "abc123", "COMPLETED")
    s = stats(con)
    assert s["tables"]["triplets"] == len(TRIPLETS) and s["tables"]["documents"] == len(TEXTS)
    assert s["facts"] == rows(con, "SELECT count(*) FROM facts")[0][0]
    assert s["relations"] == len({t["relation"] for t in TRIPLETS})
    assert [r["run_id"] for r in s["runs"]] == ["load-1"]
    assert s["file_bytes"] > 0
