"""Great Expectations gates on document shards, annotated + triplet shards, and the warehouse.

Each suite reads only the columns it needs, computes the cross-column checks GX cannot express
(span inside the text, span equal to the value, source preserved, call density, ...) as derived
columns, and then checks every column, plain or derived, with GX expectations, so each check
appears by name in the GX result. Whole texts never reach GX: only ids and derived columns do.

Great Expectations is imported on first use (it costs seconds) into one ephemeral context per
process; later calls reuse it and cost little more than reading the shards.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import markup
from schemas.reports import ExpectationOutcome, ValidationReport
from schemas.shards import TRIPLET_SCHEMA, content_hash

# What markup.escape makes inert: an escaped document text never contains these literally.
_RAW_MARKUP = ("<|db_", "[dblookup(")
_BATCH_ROWS = 4096
_MAX_EXAMPLES = 5
# Prefix of doc_ids of triplets imported from an outside database, which have no document row.
_IMPORTED_DOC_PREFIX = "import:"


class ValidationFailed(RuntimeError):
    """A suite failed; raised by a flow to stop before the warehouse is written. Carries the report."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        failed = ", ".join(
            f"{o.table}.{o.column or '*'} {o.expectation} ({o.unexpected_count})" for o in report.failures
        )
        super().__init__(f"validation suite {report.suite!r} failed: {failed}; see the validation artifact")


# --- Great Expectations, imported lazily -------------------------------------------------------

# GX contexts are not documented as thread-safe; Prefect may run validation tasks in threads.
_GX_LOCK = threading.RLock()


@functools.cache
def _gx_source() -> Any:
    """The process's ephemeral GX context's pandas data source (created on first use)."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"  # no outbound calls
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # Some GX modules pin their own logger to INFO; make them inherit the WARNING above.
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("great_expectations.") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.NOTSET)

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context.data_sources.add_pandas("lmlm")


@functools.cache
def _batch_definition(table: str) -> Any:
    return _gx_source().add_dataframe_asset(table).add_batch_definition_whole_dataframe("whole")


def _expectations() -> Any:
    """``great_expectations.expectations`` (imports GX on first use)."""
    with _GX_LOCK:
        _gx_source()
    import great_expectations as gx

    return gx.expectations


def _run_suite(
    suite: str, table: str, frame: pa.Table, id_column: str, expectations: list
) -> list[ExpectationOutcome]:
    """Validate ``frame`` against ``expectations``; outcomes in the order given."""
    import great_expectations as gx
    import pandas as pd

    df = frame.to_pandas(types_mapper=pd.ArrowDtype)
    result_format = {
        "result_format": "SUMMARY",
        "unexpected_index_column_names": [id_column],
        "partial_unexpected_count": _MAX_EXAMPLES * 4,  # unique-checks list each duplicate twice
        "return_unexpected_index_query": False,
    }
    gx_suite = gx.ExpectationSuite(name=f"{suite}.{table}")
    for position, expectation in enumerate(expectations):
        expectation.meta = {"position": position}
        gx_suite.add_expectation(expectation)
    with _GX_LOCK:
        result = _batch_definition(table).get_batch(batch_parameters={"dataframe": df}).validate(
            gx_suite, result_format=result_format
        )
    results = sorted(result.results, key=lambda r: r.expectation_config.meta["position"])
    return [_outcome(table, r, id_column) for r in results]


def _outcome(table: str, result: Any, id_column: str) -> ExpectationOutcome:
    details = result.result or {}
    examples: list[str] = []
    for row in details.get("partial_unexpected_index_list") or []:
        example = _example(row.get(id_column))
        if example not in examples:
            examples.append(example)
    observed = details.get("observed_value")
    # GX reports an error either flat or keyed by the metric that raised it.
    info = result.exception_info or {}
    infos = [info] if "raised_exception" in info else [i for i in info.values() if isinstance(i, dict)]
    errors = sorted({str(i.get("exception_message")) for i in infos if i.get("raised_exception")})
    if errors:
        observed = "GX error: " + "; ".join(errors)
    kwargs = result.expectation_config.kwargs
    return ExpectationOutcome(
        expectation=result.expectation_config.type,
        column=kwargs.get("column") or (", ".join(kwargs["column_list"]) if "column_list" in kwargs else None),
        success=bool(result.success),
        unexpected_count=int(details.get("unexpected_count") or 0),
        unexpected_examples=examples[:_MAX_EXAMPLES],
        table=table,
        observed=None if observed is None else str(observed),
    )


def _example(value: Any) -> str:
    import pandas as pd

    return "null" if value is None or value is pd.NA or value != value else str(value)


def _report(suite: str, checked: list[tuple[pa.Table, list[ExpectationOutcome]]], started: float) -> ValidationReport:
    outcomes = [o for _, table_outcomes in checked for o in table_outcomes]
    return ValidationReport(
        suite=suite,
        success=all(o.success for o in outcomes),
        n_rows=sum(frame.num_rows for frame, _ in checked),
        outcomes=outcomes,
        seconds=round(time.perf_counter() - started, 3),
    )


# --- reading shards ----------------------------------------------------------------------------


def _shard_batches(urls: list[str], columns: list[str], kind: str) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns`` from every shard; one clear error for a wrong or unreadable file."""
    for url in urls:
        with fsspec.open(url, "rb") as f:
            try:
                parquet = pq.ParquetFile(f)
            except (pa.ArrowInvalid, OSError) as exc:
                raise ValueError(
                    f"{url}: not a readable Parquet {kind} shard ({exc}); pass {kind} shards only"
                ) from None
            missing = [c for c in columns if c not in parquet.schema_arrow.names]
            if missing:
                raise ValueError(
                    f"{url}: {kind} shard lacks columns {missing}; "
                    f"pass shards written with schemas.shards.{kind.upper()}_SCHEMA"
                )
            yield from parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns)


def _read_shards(urls: list[str], columns: list[str], kind: str, schema: pa.Schema) -> pa.Table:
    """``columns`` of every shard, cast to ``schema``'s types."""
    target = pa.schema([schema.field(c).with_nullable(True) for c in columns])
    tables = [pa.Table.from_batches([b]).cast(target) for b in _shard_batches(urls, columns, kind)]
    return pa.concat_tables(tables) if tables else target.empty_table()


# --- document shards ---------------------------------------------------------------------------

_DOCUMENT_FRAME = pa.schema(
    [
        ("doc_id", pa.string()),
        ("content_hash", pa.string()),
        ("source_line", pa.int64()),
        ("text_chars", pa.int64()),  # 0 for a null text
        ("markup_escaped", pa.bool_()),  # no raw "<|db_" or "[dblookup(" in the text
        ("hash_matches", pa.bool_()),  # content_hash == schemas.shards.content_hash(text)
    ]
)


def document_frame(shard_urls: list[str]) -> pa.Table:
    """Ids and derived per-document checks of DOCUMENT_SCHEMA shards (texts are not kept)."""
    parts = []
    for batch in _shard_batches(shard_urls, ["doc_id", "text", "content_hash", "source_line"], "document"):
        texts = batch.column("text")
        raw = functools.reduce(pc.or_, [pc.match_substring(texts, s) for s in _RAW_MARKUP])
        hashes = [
            None if t is None else h == content_hash(t)
            for t, h in zip(texts.to_pylist(), batch.column("content_hash").to_pylist())
        ]
        parts.append(
            pa.table(
                [
                    batch.column("doc_id"),
                    batch.column("content_hash"),
                    batch.column("source_line"),
                    pc.fill_null(pc.utf8_length(texts), 0).cast(pa.int64()),
                    pc.invert(raw),
                    pa.array(hashes, pa.bool_()),
                ],
                schema=_DOCUMENT_FRAME,
            )
        )
    return pa.concat_tables(parts) if parts else _DOCUMENT_FRAME.empty_table()


def validate_documents(shard_urls: list[str]) -> ValidationReport:
    """Check document shards: at least one document; doc_id and content_hash non-null and unique;
    text non-empty, free of unescaped markup and hashed as content_hash; source_line >= 1."""
    started = time.perf_counter()
    frame = document_frame(shard_urls)
    E = _expectations()
    outcomes = _run_suite("documents", "documents", frame, "doc_id", [
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToNotBeNull(column="doc_id"),
        E.ExpectColumnValuesToBeUnique(column="doc_id"),
        E.ExpectColumnValuesToNotBeNull(column="content_hash"),
        E.ExpectColumnValuesToBeUnique(column="content_hash"),
        E.ExpectColumnValuesToBeBetween(column="text_chars", min_value=1),
        E.ExpectColumnValuesToBeInSet(column="markup_escaped", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="hash_matches", value_set=[True]),
        E.ExpectColumnValuesToBeBetween(column="source_line", min_value=1),
    ])
    return _report("documents", [(frame, outcomes)], started)


# --- annotated + triplet shards ----------------------------------------------------------------

_ANNOTATED_FRAME = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text_version", pa.int32()),
        ("annotator", pa.string()),
        ("annotator_version", pa.string()),
        ("source_preserved", pa.bool_()),  # markup.strip(annotated_text) == text
        ("markup_well_formed", pa.bool_()),  # every call in annotated_text parses
        ("n_calls_matches", pa.bool_()),  # n_calls == calls parsed from annotated_text
        ("calls_per_100_words", pa.float64()),
    ]
)
# An annotated row's key (as in the warehouse), and the part of it a triplet carries.
_ANNOTATED_KEY = ["doc_id", "text_version", "annotator", "annotator_version"]
_ANNOTATOR_KEY = ("doc_id", "annotator", "annotator_version")

_TRIPLET_COLUMNS = [
    "triplet_id", "doc_id", "entity", "relation", "value", "call_offset", "value_start", "value_end",
    "annotator", "annotator_version", "confidence",
]
_TEXT_CHECKS = ("call_in_annotated_text", "span_in_text", "span_matches", "call_precedes_value")


def annotation_frames(annotated_urls: list[str], triplet_urls: list[str]) -> tuple[pa.Table, pa.Table]:
    """Per-document and per-triplet derived checks of ANNOTATED and TRIPLET shards.

    A triplet is checked against the annotated row with its doc_id, annotator and annotator_version
    (the highest text_version when there are several). Checks that need that row's text are null
    when there is none (``doc_annotated`` is then False); span checks are null for a triplet
    without a span. Entity containment ignores case.
    """
    triplets = _read_shards(triplet_urls, _TRIPLET_COLUMNS, "triplet", TRIPLET_SCHEMA)
    t = {c: triplets.column(c).to_pylist() for c in _TRIPLET_COLUMNS}
    triplets_of: dict[tuple, list[int]] = defaultdict(list)
    for i, key in enumerate(zip(*(t[c] for c in _ANNOTATOR_KEY))):
        triplets_of[key].append(i)
    checked_version = [-1] * triplets.num_rows  # text_version each triplet was checked against
    text_checks: dict[str, list[bool | None]] = {c: [None] * triplets.num_rows for c in _TEXT_CHECKS}

    annotated_parts = []
    columns = [*_ANNOTATED_KEY, "text", "annotated_text", "n_calls"]
    for batch in _shard_batches(annotated_urls, columns, "annotated"):
        a = {c: batch.column(c).to_pylist() for c in columns}
        preserved, well_formed, n_calls_ok, density = [], [], [], []
        for j, (text, annotated_text) in enumerate(zip(a["text"], a["annotated_text"])):
            parsed, errors = markup.parse_lenient(annotated_text or "")
            preserved.append(None not in (text, annotated_text) and markup.strip(annotated_text) == text)
            well_formed.append(not errors)
            n_calls_ok.append(a["n_calls"][j] == len(parsed.calls))
            density.append(markup.calls_per_100_words(parsed))
            placed = {(p.offset, p.call.entity, p.call.relation, p.call.value) for p in parsed.calls}
            version = a["text_version"][j] or 0
            for i in triplets_of.get(tuple(a[c][j] for c in _ANNOTATOR_KEY), ()):
                if version > checked_version[i]:
                    checked_version[i] = version
                    results = _triplet_text_checks(text or "", placed, *(t[c][i] for c in (
                        "call_offset", "entity", "relation", "value", "value_start", "value_end")))
                    for name, ok in zip(_TEXT_CHECKS, results):
                        text_checks[name][i] = ok
        derived = [pa.array(preserved, pa.bool_()), pa.array(well_formed, pa.bool_()),
                   pa.array(n_calls_ok, pa.bool_()), pa.array(density, pa.float64())]
        key = [batch.column(c).cast(_ANNOTATED_FRAME.field(c).type) for c in _ANNOTATED_KEY]
        annotated_parts.append(pa.table(key + derived, schema=_ANNOTATED_FRAME))
    annotated = pa.concat_tables(annotated_parts) if annotated_parts else _ANNOTATED_FRAME.empty_table()

    triplet_frame = triplets.select(["triplet_id", "doc_id", "relation", "confidence"])
    entities, relations, values = t["entity"], t["relation"], t["value"]
    derived_columns = {
        "lookup_well_formed": [_lookup_well_formed(e, r, v) for e, r, v in zip(entities, relations, values)],
        "entity_not_in_value": [
            None if e is None or v is None else e.casefold() not in v.casefold() for e, v in zip(entities, values)
        ],
        "doc_annotated": [v >= 0 for v in checked_version],
        **text_checks,
    }
    for name, column in derived_columns.items():
        triplet_frame = triplet_frame.append_column(name, pa.array(column, pa.bool_()))
    return annotated, triplet_frame


def _triplet_text_checks(
    text: str, placed: set[tuple], offset: int | None, entity: str | None, relation: str | None,
    value: str | None, start: int | None, end: int | None,
) -> tuple[bool, bool | None, bool | None, bool | None]:
    """(call in the annotated text, span inside the text, span == value, span right after the call)."""
    call_in_text = (offset, entity, relation, value) in placed
    if start is None and end is None:
        return call_in_text, None, None, None  # no mention recorded: no span to check
    inside = start is not None and end is not None and 0 <= start < end <= len(text)
    matches = inside and text[start:end] == value
    follows_call = (
        inside and value is not None and offset is not None and markup.mention_span(text, offset, value) == (start, end)
    )
    return call_in_text, inside, matches, follows_call


def _lookup_well_formed(entity: str | None, relation: str | None, value: str | None) -> bool:
    try:
        markup.LookupCall(entity, relation, value)  # type: ignore[arg-type]
    except markup.MarkupError:
        return False
    return True


def validate_annotations(
    annotated_urls: list[str],
    triplet_urls: list[str],
    relation_vocabulary: set[str] | None = None,
    max_calls_per_100_words: float = 12.0,
) -> ValidationReport:
    """Check annotated shards (at least one row; doc_id non-null; one row per doc_id, text_version,
    annotator and annotator_version; source text preserved; markup well formed; n_calls right; at most
    ``max_calls_per_100_words``) and triplet shards (triplet_id non-null and unique; the doc annotated
    by the triplet's annotator; entity/relation/value a valid lookup; relation in the vocabulary when
    given; entity not contained in value; confidence in [0, 1]; the call present in the annotated text
    at call_offset; the value span inside the text, equal to the value, and right after the call).
    """
    started = time.perf_counter()
    annotated, triplets = annotation_frames(annotated_urls, triplet_urls)
    E = _expectations()
    annotated_outcomes = _run_suite("annotations", "annotated", annotated, "doc_id", [
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToNotBeNull(column="doc_id"),
        E.ExpectCompoundColumnsToBeUnique(column_list=_ANNOTATED_KEY),
        E.ExpectColumnValuesToBeInSet(column="source_preserved", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="markup_well_formed", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="n_calls_matches", value_set=[True]),
        E.ExpectColumnValuesToBeBetween(column="calls_per_100_words", min_value=0, max_value=max_calls_per_100_words),
    ])
    triplet_expectations = [
        E.ExpectColumnValuesToNotBeNull(column="triplet_id"),
        E.ExpectColumnValuesToBeUnique(column="triplet_id"),
        E.ExpectColumnValuesToNotBeNull(column="doc_id"),
        E.ExpectColumnValuesToBeInSet(column="doc_annotated", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="lookup_well_formed", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="entity_not_in_value", value_set=[True]),
        E.ExpectColumnValuesToBeBetween(column="confidence", min_value=0, max_value=1),
        E.ExpectColumnValuesToBeInSet(column="call_in_annotated_text", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="span_in_text", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="span_matches", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="call_precedes_value", value_set=[True]),
    ]
    if relation_vocabulary is not None:
        triplet_expectations.append(
            E.ExpectColumnValuesToBeInSet(column="relation", value_set=sorted(relation_vocabulary))
        )
    triplet_outcomes = _run_suite("annotations", "triplets", triplets, "triplet_id", triplet_expectations)
    return _report("annotations", [(annotated, annotated_outcomes), (triplets, triplet_outcomes)], started)


# --- warehouse ---------------------------------------------------------------------------------

_WAREHOUSE_RELATIONS = ("documents", "triplets", "facts")


def warehouse_frames(db_path: str) -> dict[str, pa.Table]:
    """The warehouse columns the suite checks, read through a read-only DuckDB connection."""
    import duckdb

    if not os.path.exists(db_path):
        raise FileNotFoundError(f"{db_path}: no warehouse file there; build it with the load task or pass its path")
    with duckdb.connect(db_path, read_only=True) as con:
        present = {name for (name,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        missing = [r for r in _WAREHOUSE_RELATIONS if r not in present]
        if missing:
            raise ValueError(f"{db_path}: warehouse lacks {missing}; rebuild it with the warehouse loader")
        return {
            "documents": con.sql("SELECT doc_id FROM documents").to_arrow_table(),
            "triplets": con.sql(
                f"""SELECT triplet_id, doc_id, entity, relation, value,
                       starts_with(doc_id, '{_IMPORTED_DOC_PREFIX}')
                       OR doc_id IN (SELECT doc_id FROM documents) AS doc_known
                    FROM triplets"""
            ).to_arrow_table(),
            "facts": con.sql(
                """SELECT entity, relation, value,
                       concat_ws(' / ', coalesce(entity, 'null'), coalesce(relation, 'null')) AS fact
                    FROM facts"""
            ).to_arrow_table(),
        }


def validate_warehouse(db_path: str) -> ValidationReport:
    """Check the warehouse: document and triplet ids non-null and unique; every triplet's doc_id
    a loaded document (``import:*`` doc_ids excepted); triplet keys non-null; the ``facts`` view
    non-empty with no null entity, relation or value."""
    started = time.perf_counter()
    frames = warehouse_frames(db_path)
    E = _expectations()
    checked = [
        (frames["documents"], _run_suite("warehouse", "documents", frames["documents"], "doc_id", [
            E.ExpectColumnValuesToNotBeNull(column="doc_id"),
            E.ExpectColumnValuesToBeUnique(column="doc_id"),
        ])),
        (frames["triplets"], _run_suite("warehouse", "triplets", frames["triplets"], "triplet_id", [
            E.ExpectColumnValuesToNotBeNull(column="triplet_id"),
            E.ExpectColumnValuesToBeUnique(column="triplet_id"),
            E.ExpectColumnValuesToNotBeNull(column="doc_id"),
            E.ExpectColumnValuesToBeInSet(column="doc_known", value_set=[True]),
            *(E.ExpectColumnValuesToNotBeNull(column=c) for c in ("entity", "relation", "value")),
        ])),
        (frames["facts"], _run_suite("warehouse", "facts", frames["facts"], "fact", [
            E.ExpectTableRowCountToBeBetween(min_value=1),
            *(E.ExpectColumnValuesToNotBeNull(column=c) for c in ("entity", "relation", "value")),
        ])),
    ]
    return _report("warehouse", checked, started)
