"""Validation suites: good shards pass; each crafted defect fails its named expectation with the right count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import markup
from schemas.shards import ANNOTATED_SCHEMA, DOCUMENT_SCHEMA, TRIPLET_SCHEMA, content_hash, triplet_id
from tasks.validate import (
    ValidationFailed,
    ValidationReport,
    validate_annotations,
    validate_documents,
    validate_warehouse,
)

ROOT = Path(__file__).resolve().parents[1]
FILLER = (
    " Her notes on the engine describe how a machine could follow a sequence of operations,"
    " and she wrote letters to friends about music, poetry and mathematics for many years."
)  # 30 words, so two calls stay well under 12 calls per 100 words


def write_shard(path: Path, rows: list[dict], schema: pa.Schema) -> str:
    """A zstd Parquet shard; nullable copy of the schema so tests can plant nulls."""
    loose = pa.schema([f.with_nullable(True) for f in schema])
    pq.write_table(pa.Table.from_pylist(rows, schema=loose), path, compression="zstd")
    return str(path)


def document(doc_id: str, text: str) -> dict:
    return {"doc_id": doc_id, "text": text, "content_hash": content_hash(text),
            "source_file": "corpus.jsonl", "source_line": 1, "run_id": "run-1"}


def annotate(
    doc_id: str, text: str, facts: list[tuple[str, str, str]], annotator: str = "gold"
) -> tuple[dict, list[dict]]:
    """An annotated row and its triplets: each call goes before the first ' value' mention."""
    placed = []
    for entity, relation, value in facts:
        offset = text.index(" " + value)
        placed.append(markup.PlacedCall(offset, markup.LookupCall(entity, relation, value)))
    placed.sort(key=lambda p: p.offset)
    annotated = markup.Annotated(text, tuple(placed))
    row = {"doc_id": doc_id, "text": text, "annotated_text": markup.render(annotated), "n_calls": len(placed),
           "text_version": 0, "annotator": annotator, "annotator_version": "1", "run_id": "run-1"}
    triplets = []
    for p in placed:
        start, end = markup.mention_span(text, p.offset, p.call.value)
        triplets.append({
            "triplet_id": triplet_id(doc_id, p.offset, p.call.entity, p.call.relation, p.call.value, annotator),
            "doc_id": doc_id, "entity": p.call.entity, "relation": p.call.relation, "value": p.call.value,
            "call_offset": p.offset, "value_start": start, "value_end": end,
            "annotator": annotator, "annotator_version": "1", "run_id": "run-1", "confidence": 0.9,
        })
    return row, triplets


def good_annotations() -> tuple[list[dict], list[dict]]:
    rows, triplets = [], []
    people = [("d1", "Ada Lovelace", "London", "1815"), ("d2", "Mary Somerville", "Jedburgh", "1780")]
    for doc_id, name, city, year in people:
        row, trips = annotate(doc_id, f"{name} was born in {city} in {year}.{FILLER}",
                              [(name, "birthplace", city), (name, "birth year", year)])
        rows.append(row)
        triplets += trips
    return rows, triplets


def failing(report: ValidationReport) -> dict[tuple[str, str | None, str], int]:
    return {(o.table, o.column, o.expectation): o.unexpected_count for o in report.outcomes if not o.success}


# --- documents ---------------------------------------------------------------------------------


def test_good_document_shards_pass_and_escaped_markup_is_allowed(tmp_path):
    quoting = [document("a", "Plain text."), document("b", markup.escape("uses <|db_entity|> literally"))]
    first = write_shard(tmp_path / "a.parquet", quoting, DOCUMENT_SCHEMA)
    legacy = [document("c", markup.escape("[dblookup('x', 'y') -> z] in prose"))]
    second = write_shard(tmp_path / "b.parquet", legacy, DOCUMENT_SCHEMA)

    report = validate_documents([first, second])

    assert report.success, report.markdown()
    assert report.n_rows == 3
    assert not failing(report)


@pytest.mark.parametrize(
    "docs, column, expectation, count, example",
    [
        ([document("a", "one"), document("a", "two")], "doc_id", "expect_column_values_to_be_unique", 2, "a"),
        ([document("a", "one"), {**document("b", "two"), "doc_id": None}],
         "doc_id", "expect_column_values_to_not_be_null", 1, "null"),
        ([document("a", "same"), document("b", "same")], "content_hash", "expect_column_values_to_be_unique", 2, "a"),
        ([document("a", "one"), document("b", "")], "text_chars", "expect_column_values_to_be_between", 1, "b"),
        ([document("a", "x <|db_end|> y"), document("b", "[dblookup('a', 'b') -> c]"), document("c", "ok")],
         "markup_escaped", "expect_column_values_to_be_in_set", 2, "a"),
        ([document("a", "one"), {**document("b", "two"), "content_hash": content_hash("other")}],
         "hash_matches", "expect_column_values_to_be_in_set", 1, "b"),
        ([document("a", "one"), {**document("b", "two"), "source_line": 0}],
         "source_line", "expect_column_values_to_be_between", 1, "b"),
    ],
    ids=["duplicate-id", "null-id", "duplicate-hash", "empty-text", "raw-markup", "wrong-hash", "bad-line"],
)
def test_each_document_defect_fails_its_expectation(tmp_path, docs, column, expectation, count, example):
    report = validate_documents([write_shard(tmp_path / "d.parquet", docs, DOCUMENT_SCHEMA)])

    assert not report.success
    assert failing(report) == {("documents", column, expectation): count}
    (outcome,) = report.failures
    assert example in outcome.unexpected_examples


def test_duplicate_ids_across_shards_are_caught(tmp_path):
    a = write_shard(tmp_path / "a.parquet", [document("x", "one")], DOCUMENT_SCHEMA)
    b = write_shard(tmp_path / "b.parquet", [document("x", "two")], DOCUMENT_SCHEMA)

    assert failing(validate_documents([a, b])) == {("documents", "doc_id", "expect_column_values_to_be_unique"): 2}


def test_no_documents_fails_the_row_count():
    report = validate_documents([])

    assert failing(report) == {("documents", None, "expect_table_row_count_to_be_between"): 0}
    assert report.failures[0].observed == "0"


def test_wrong_or_unreadable_shard_is_one_clear_error(tmp_path):
    triplets = write_shard(tmp_path / "t.parquet", good_annotations()[1], TRIPLET_SCHEMA)
    lacks = r"t\.parquet: document shard lacks columns \['text', 'content_hash', 'source_line'\]"
    with pytest.raises(ValueError, match=lacks):
        validate_documents([triplets])
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(ValueError, match="junk.parquet: not a readable Parquet document shard"):
        validate_documents([str(junk)])


def test_fsspec_urls_are_read(tmp_path):
    import fsspec

    with fsspec.open("memory://validate/docs.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist([document("a", "one")], schema=DOCUMENT_SCHEMA), f)

    assert validate_documents(["memory://validate/docs.parquet"]).n_rows == 1


# --- annotated + triplet shards ----------------------------------------------------------------


def annotation_report(tmp_path, rows, triplets, **kwargs) -> ValidationReport:
    return validate_annotations(
        [write_shard(tmp_path / "ann.parquet", rows, ANNOTATED_SCHEMA)],
        [write_shard(tmp_path / "trip.parquet", triplets, TRIPLET_SCHEMA)],
        **kwargs,
    )


def test_good_annotations_pass(tmp_path):
    rows, triplets = good_annotations()

    report = annotation_report(tmp_path, rows, triplets, relation_vocabulary={"birthplace", "birth year"})

    assert report.success, report.markdown()
    assert report.n_rows == len(rows) + len(triplets) == 6
    assert any(o.column == "relation" for o in report.outcomes)


def test_a_document_annotated_by_two_annotators_is_checked_per_annotator(tmp_path):
    rows, triplets = good_annotations()
    # Another annotator calls a relation the gold annotation does not have.
    other, other_triplets = annotate("d1", rows[0]["text"], [("Ada Lovelace", "home city", "London")], "finetuned")

    assert annotation_report(tmp_path, rows + [other], triplets + other_triplets).success
    misfiled = dict(other_triplets[0], triplet_id="x", annotator="gold")
    report = annotation_report(tmp_path, rows + [other], triplets + other_triplets + [misfiled])
    assert failing(report) == {("triplets", "call_in_annotated_text", "expect_column_values_to_be_in_set"): 1}


def test_triplets_without_a_span_skip_span_checks(tmp_path):
    rows, triplets = good_annotations()
    triplets[0] |= {"value_start": None, "value_end": None}

    assert annotation_report(tmp_path, rows, triplets).success


def _break_annotations(case: str) -> tuple[list[dict], list[dict]]:
    rows, triplets = good_annotations()
    t = triplets[0]
    if case == "duplicate-doc":
        rows.append(dict(rows[0]))
    elif case == "source-changed":
        rows[0]["text"] = rows[0]["text"].replace("engine", "device")  # same length: spans still hold
    elif case == "malformed-call":
        rows[0]["annotated_text"] += f"{markup.DB_ENTITY} {markup.DB_RELATIONSHIP} r{markup.DB_RETURN} v{markup.DB_END}"
    elif case == "n-calls":
        rows[0]["n_calls"] = 5
    elif case == "duplicate-triplet":
        triplets.append(dict(t))
    elif case == "null-triplet-id":
        t["triplet_id"] = None
    elif case == "null-doc":
        rows[0]["doc_id"] = None
    elif case == "null-triplet-doc":
        t["doc_id"] = None
    elif case == "orphan-triplet":
        t["doc_id"] = "nowhere"
    elif case == "bad-confidence":
        t["confidence"] = 1.5
    elif case == "call-not-in-text":
        t["entity"] = "Ada King"
    elif case == "span-outside":
        t["value_end"] = len(rows[0]["text"]) + 5
    elif case == "span-mismatch":
        t["value_start"] += 1
        t["value_end"] += 1
    elif case == "entity-in-value":
        text = f"Ada was known to all as Ada Lovelace.{FILLER}"
        row, trips = annotate("d3", text, [("Lovelace", "full name", "Ada Lovelace")])
        rows.append(row)
        triplets += trips
    elif case == "call-not-before-value":
        # The value is mentioned twice; the span names the second mention, the call sits before the first.
        text = f"Ada lived in London. Later, London honoured her.{FILLER}"
        row, trips = annotate("d3", text, [("Ada Lovelace", "residence", "London")])
        second = text.rindex("London")
        trips[0] |= {"value_start": second, "value_end": second + len("London")}
        rows.append(row)
        triplets += trips
    return rows, triplets


@pytest.mark.parametrize(
    "case, table, column, expectation, count",
    [
        ("duplicate-doc", "annotated", "doc_id, text_version, annotator, annotator_version",
         "expect_compound_columns_to_be_unique", 2),
        ("source-changed", "annotated", "source_preserved", "expect_column_values_to_be_in_set", 1),
        ("malformed-call", "annotated", "markup_well_formed", "expect_column_values_to_be_in_set", 1),
        ("n-calls", "annotated", "n_calls_matches", "expect_column_values_to_be_in_set", 1),
        ("duplicate-triplet", "triplets", "triplet_id", "expect_column_values_to_be_unique", 2),
        ("bad-confidence", "triplets", "confidence", "expect_column_values_to_be_between", 1),
        ("call-not-in-text", "triplets", "call_in_annotated_text", "expect_column_values_to_be_in_set", 1),
        ("entity-in-value", "triplets", "entity_not_in_value", "expect_column_values_to_be_in_set", 1),
        ("call-not-before-value", "triplets", "call_precedes_value", "expect_column_values_to_be_in_set", 1),
    ],
)
def test_each_annotation_defect_fails_only_its_expectation(tmp_path, case, table, column, expectation, count):
    rows, triplets = _break_annotations(case)

    report = annotation_report(tmp_path, rows, triplets)

    assert not report.success
    assert failing(report) == {(table, column, expectation): count}


@pytest.mark.parametrize(
    "case, table, column, expectation",
    [
        ("null-doc", "annotated", "doc_id", "expect_column_values_to_not_be_null"),
        ("null-triplet-id", "triplets", "triplet_id", "expect_column_values_to_not_be_null"),
        ("null-triplet-doc", "triplets", "doc_id", "expect_column_values_to_not_be_null"),
        ("orphan-triplet", "triplets", "doc_annotated", "expect_column_values_to_be_in_set"),
        ("span-outside", "triplets", "span_in_text", "expect_column_values_to_be_in_set"),
        ("span-mismatch", "triplets", "span_matches", "expect_column_values_to_be_in_set"),
    ],
)
def test_defects_with_knock_on_effects_fail_their_expectation(tmp_path, case, table, column, expectation):
    rows, triplets = _break_annotations(case)

    report = annotation_report(tmp_path, rows, triplets)

    assert failing(report).get((table, column, expectation)) == 1


def test_no_annotated_documents_fails_the_row_count():
    report = validate_annotations([], [])

    assert failing(report) == {("annotated", None, "expect_table_row_count_to_be_between"): 0}


def test_span_mismatch_names_the_triplet(tmp_path):
    rows, triplets = _break_annotations("span-mismatch")

    report = annotation_report(tmp_path, rows, triplets)

    (outcome,) = [o for o in report.failures if o.column == "span_matches"]
    assert outcome.unexpected_examples == [triplets[0]["triplet_id"]]


def test_call_density_is_bounded_by_the_configured_maximum(tmp_path):
    rows, triplets = good_annotations()
    facts = [("Ada Lovelace", "met", "Mary"), ("Ada Lovelace", "visited", "London")]
    row, trips = annotate("dense", "Ada met Mary in London in 1834.", facts)
    rows.append(row)
    triplets += trips  # 2 calls in 7 words: 28.6 per 100 words

    assert failing(annotation_report(tmp_path, rows, triplets)) == {
        ("annotated", "calls_per_100_words", "expect_column_values_to_be_between"): 1
    }
    assert annotation_report(tmp_path, rows, triplets, max_calls_per_100_words=30.0).success


def test_relation_outside_the_vocabulary_fails(tmp_path):
    rows, triplets = good_annotations()

    report = annotation_report(tmp_path, rows, triplets, relation_vocabulary={"birthplace"})

    assert failing(report) == {("triplets", "relation", "expect_column_values_to_be_in_set"): 2}


def test_malformed_lookup_key_fails(tmp_path):
    rows, triplets = good_annotations()
    triplets[0]["relation"] = " birthplace"  # surrounding whitespace is never a valid key

    report = annotation_report(tmp_path, rows, triplets)

    assert failing(report)[("triplets", "lookup_well_formed", "expect_column_values_to_be_in_set")] == 1


# --- warehouse ---------------------------------------------------------------------------------


def make_warehouse(path: Path, documents: list[str], triplets: list[tuple]) -> str:
    """A tiny warehouse with the tables and views the suite relies on, in the project's storage version."""
    con = duckdb.connect()
    con.execute(f"ATTACH '{path}' AS w (STORAGE_VERSION 'v1.5.0')")
    con.execute("USE w")
    con.execute("CREATE TABLE documents (doc_id VARCHAR)")
    con.execute(
        "CREATE TABLE triplets (triplet_id VARCHAR, doc_id VARCHAR, entity VARCHAR, relation VARCHAR, value VARCHAR)"
    )
    con.executemany("INSERT INTO documents VALUES (?)", [(d,) for d in documents])
    if triplets:
        con.executemany("INSERT INTO triplets VALUES (?, ?, ?, ?, ?)", triplets)
    con.execute("CREATE VIEW facts AS SELECT DISTINCT entity, relation, value FROM triplets")
    con.close()
    return str(path)


GOOD_TRIPLETS = [
    ("t1", "d1", "Ada Lovelace", "birthplace", "London"),
    ("t2", "d1", "Ada Lovelace", "birth year", "1815"),
    ("t3", "import:wikidata", "Mary Somerville", "birthplace", "Jedburgh"),
]


def test_good_warehouse_passes(tmp_path):
    report = validate_warehouse(make_warehouse(tmp_path / "w.duckdb", ["d1"], GOOD_TRIPLETS))

    assert report.success, report.markdown()
    assert report.n_rows == 1 + 3 + 3


@pytest.mark.parametrize(
    "documents, triplets, expected",
    [
        (["d1"], GOOD_TRIPLETS + [("t1", "d1", "Ada Lovelace", "died", "1852")],
         {("triplets", "triplet_id", "expect_column_values_to_be_unique"): 2}),
        (["d1"], GOOD_TRIPLETS + [("t4", "d9", "Ada Lovelace", "died", "1852")],
         {("triplets", "doc_known", "expect_column_values_to_be_in_set"): 1}),
        (["d1", "d1"], GOOD_TRIPLETS, {("documents", "doc_id", "expect_column_values_to_be_unique"): 2}),
        (["d1"], GOOD_TRIPLETS + [("t4", "d1", "Ada Lovelace", "died", None)],
         {("triplets", "value", "expect_column_values_to_not_be_null"): 1,
          ("facts", "value", "expect_column_values_to_not_be_null"): 1}),
        (["d1"], [], {("facts", None, "expect_table_row_count_to_be_between"): 0}),
    ],
    ids=["duplicate-triplet", "unknown-doc", "duplicate-doc", "null-value", "no-facts"],
)
def test_each_warehouse_defect_fails_its_expectation(tmp_path, documents, triplets, expected):
    report = validate_warehouse(make_warehouse(tmp_path / "w.duckdb", documents, triplets))

    assert not report.success
    assert failing(report) == expected


def test_missing_warehouse_or_table_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.duckdb: no warehouse file"):
        validate_warehouse(str(tmp_path / "nothere.duckdb"))
    duckdb.connect(str(tmp_path / "bare.duckdb")).execute("CREATE TABLE documents (doc_id VARCHAR)").close()
    with pytest.raises(ValueError, match=r"bare.duckdb: warehouse lacks \['triplets', 'facts'\]"):
        validate_warehouse(str(tmp_path / "bare.duckdb"))


# --- report, failure, packaging ----------------------------------------------------------------


def test_markdown_lists_every_outcome_and_names_failures(tmp_path):
    docs = [document("a|b", "one"), document("a|b", "two")]
    report = validate_documents([write_shard(tmp_path / "d.parquet", docs, DOCUMENT_SCHEMA)])

    md = report.markdown()

    assert md.startswith("### Validation `documents`: **FAILED** (1 of 9 expectations)")
    table_rows = [line for line in md.splitlines() if line.startswith("| documents |")]
    assert len(table_rows) == len(report.outcomes) == 9
    (failed,) = [line for line in table_rows if "❌" in line]
    assert "expect_column_values_to_be_unique | doc_id" in failed and "`a\\|b`" in failed


def test_validation_failed_carries_the_report_and_names_the_failure(tmp_path):
    report = validate_documents([])

    error = ValidationFailed(report)

    assert error.report is report
    assert "'documents' failed: documents.* expect_table_row_count_to_be_between" in str(error)


def test_examples_are_ids_not_texts(tmp_path):
    long_text = "word " * 500
    docs = [document(f"id{i}", long_text + "<|db_end|>" + str(i)) for i in range(20)]
    report = validate_documents([write_shard(tmp_path / "d.parquet", docs, DOCUMENT_SCHEMA)])

    (outcome,) = report.failures
    assert outcome.unexpected_count == 20
    assert 1 <= len(outcome.unexpected_examples) <= 5
    assert all(e.startswith("id") and len(e) < 10 for e in outcome.unexpected_examples)


def test_an_expectation_gx_cannot_evaluate_fails_and_says_why():
    from tasks import validate

    E = validate._expectations()
    probe = pa.table({"a": [1]})
    outcomes = validate._run_suite("s", "probe", probe, "a", [E.ExpectColumnValuesToBeUnique(column="zz")])

    assert not outcomes[0].success
    assert 'column "zz"' in outcomes[0].observed


def test_prefect_task_wrappers_keep_the_plain_function():
    from flows.stages import validate_documents_task

    assert validate_documents_task.name == "validate-documents"
    assert validate_documents_task.fn is validate_documents


def test_importing_the_module_does_not_import_great_expectations():
    code = "import sys, tasks.validate; print('great_expectations' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
