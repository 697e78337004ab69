"""The DuckDB warehouse file: connecting, lineage, idempotent loading from shards, stats, ad-hoc SQL.

One local DuckDB file holds documents, annotations and triplets loaded from shards, plus the layers
people and correctors add on top (aliases, fact edits, audit log). DDL and views live in
``warehouse/sql/*.sql``. The file is written with DuckDB storage version v1.5.0 so the stock
DuckDB CLI 1.5 opens it as well as the 2.x Python package.
"""

from __future__ import annotations

import datetime as dt
import functools
import getpass
import hashlib
import json
import os
import re
import subprocess
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.errors import UserInputError
from schemas.shards import ANNOTATED_SCHEMA, DOCUMENT_SCHEMA, TRIPLET_SCHEMA

SQL_DIR = Path(__file__).with_name("sql")
STORAGE_VERSION = "v1.5.0"  # the newest format the stock duckdb CLI 1.5 reads
SCHEMA_VERSION = 1  # bump with a migration when a table changes incompatibly
CATALOG = "w"

# Loaded tables and the columns that identify a row (what makes reloading idempotent).
KEYS = {
    "documents": ("doc_id",),
    "annotations": ("doc_id", "text_version", "annotator", "annotator_version"),
    "triplets": ("triplet_id",),
}
SHARD_SCHEMAS = {"documents": DOCUMENT_SCHEMA, "annotations": ANNOTATED_SCHEMA, "triplets": TRIPLET_SCHEMA}


class WarehouseError(UserInputError):
    """A problem the user can fix; the message is one line naming the input and the fix."""


class WarehouseBusyError(WarehouseError):
    """Another process holds the warehouse file's write lock."""


def utc_now() -> dt.datetime:
    """Naive UTC timestamp, the convention of every TIMESTAMP column in the warehouse."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # containers without a passwd entry
        return "unknown"


def _sql_string(s: str) -> str:
    """A SQL string literal, for the few statements (ATTACH) that take no parameters."""
    return "'" + s.replace("'", "''") + "'"


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def first_row(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> tuple | None:
    """The first row of a query, or None; reads the result to the end (DuckDB 2 refuses new work
    on a connection with a half-read result)."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection):
    """All statements inside commit together or not at all."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


# --------------------------------------------------------------------------- connecting


def connect(path: str | os.PathLike, read_only: bool = False, wait_s: float = 0.0) -> duckdb.DuckDBPyConnection:
    """A connection whose default database is the warehouse file at ``path``.

    Writable connections create the file, its folder and the schema when missing and (re)apply the
    DDL and views idempotently. Read-only connections need an existing file and never write it.
    When another process holds the file's lock, retries for ``wait_s`` seconds, then raises
    :class:`WarehouseBusyError`. Only one writable connection per file exists at a time.
    """
    path = os.fspath(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path:
        raise WarehouseError(f"warehouse {path}: must be a local file path (DuckDB updates it in place)")
    if read_only and not os.path.exists(path):
        raise WarehouseError(f"warehouse {path} does not exist; check the path or build it first (lmlm run)")
    if not read_only and os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)

    con = duckdb.connect()
    options = "READ_ONLY" if read_only else f"STORAGE_VERSION '{STORAGE_VERSION}'"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            con.execute(f"ATTACH {_sql_string(path)} AS {CATALOG} ({options})")
            break
        except duckdb.Error as e:
            lock_held = "could not set lock" in str(e).lower()
            if lock_held and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            con.close()
            if lock_held:
                holder = re.search(r"PID \d+", str(e))
                waited = f" (still, after waiting {wait_s:g} s)" if wait_s else ""
                raise WarehouseBusyError(
                    f"warehouse {path} is open for writing by another process"
                    f"{' (' + holder.group(0) + ')' if holder else ''}{waited}; wait for it to finish and retry"
                    f"{', or raise warehouse_wait_s' if wait_s else ''}"
                ) from None
            raise WarehouseError(f"warehouse {path}: cannot open it ({_first_line(e)})") from None
    con.execute(f"USE {CATALOG}")
    if not read_only:
        try:
            _apply_schema(con, path)
        except BaseException:
            con.close()
            raise
    return con


def _apply_schema(con: duckdb.DuckDBPyConnection, path: str) -> None:
    with transaction(con):
        for script in sorted(SQL_DIR.glob("*.sql")):
            con.execute(script.read_text(encoding="utf-8"))
        row = first_row(con, "SELECT value FROM meta WHERE key = 'schema_version'")
        if row is None:
            con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        elif int(row[0]) > SCHEMA_VERSION:
            raise WarehouseError(
                f"warehouse {path} has schema version {row[0]}, newer than this code's {SCHEMA_VERSION};"
                " upgrade lmlm-pipeline"
            )


def database_path(con: duckdb.DuckDBPyConnection) -> str | None:
    row = first_row(con, "SELECT path FROM duckdb_databases() WHERE database_name = current_database()")
    return row[0] if row else None


# --------------------------------------------------------------------------- lineage


@functools.cache
def code_version() -> str:
    """Package version plus the git commit when running from a checkout (recorded on every run)."""
    try:
        v = version("lmlm-pipeline")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+g{sha}" if sha else v


def record_run(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    flow: str,
    config: dict,
    inputs: list[str],
    code_version: str,
    status: str,
    counts: dict | None = None,
    started_at: dt.datetime | None = None,
    finished_at: dt.datetime | None = None,
) -> None:
    """Insert or update the lineage row of ``run_id``; a later call keeps the first ``started_at``."""
    if not run_id or not flow or not status:
        raise WarehouseError("record_run: run_id, flow and status must be non-empty")
    con.execute(
        """
        INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (run_id) DO UPDATE SET
            flow = excluded.flow, config = excluded.config, inputs = excluded.inputs,
            code_version = excluded.code_version, status = excluded.status,
            counts = coalesce(excluded.counts, runs.counts),
            started_at = coalesce(runs.started_at, excluded.started_at),
            finished_at = coalesce(excluded.finished_at, runs.finished_at)
        """,
        [
            run_id, flow, json.dumps(config, sort_keys=True, default=str), [str(i) for i in inputs],
            code_version, status, None if counts is None else json.dumps(counts, sort_keys=True, default=str),
            started_at or utc_now(), finished_at,
        ],
    ).fetchall()


# --------------------------------------------------------------------------- loading


def _duckdb_path(con: duckdb.DuckDBPyConnection, url: str) -> str:
    """What DuckDB's read_parquet is given for a shard URL: local paths natively, others via fsspec."""
    if url.startswith("file://"):
        return url[len("file://"):]
    protocol, sep, _ = url.partition("://")
    if not sep:
        return url
    if not con.filesystem_is_registered(protocol):
        try:
            con.register_filesystem(fsspec.filesystem(protocol))
        except (ImportError, ValueError) as e:
            raise WarehouseError(
                f"shard {url}: no filesystem for {protocol}:// ({_first_line(e)}); install its fsspec package"
            ) from None
        except duckdb.InvalidInputException:  # registered under its other name (s3 / s3a)
            pass
    return url


def _shard_rows(url: str, schema: pa.Schema, table: str) -> int:
    """Rows in a shard, after checking from its footer alone that it can load into ``table``."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.read_metadata(f)
    except FileNotFoundError:
        raise WarehouseError(f"shard {url} not found; check the path or re-run the step that writes it") from None
    except IsADirectoryError:
        raise WarehouseError(f"shard {url} is a folder; pass the .parquet files in it") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise WarehouseError(f"shard {url} is not a readable Parquet file ({_first_line(e)})") from None
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    missing = [n for n in schema.names if n not in names]
    if missing:
        raise WarehouseError(
            f"shard {url} lacks columns {missing}; {table} shards follow schemas.shards "
            f"(is this a {table} shard?)"
        )
    index = {n: i for i, n in enumerate(names)}
    for field in schema:
        if field.nullable:
            continue
        nulls = 0
        for rg in range(meta.num_row_groups):
            stats = meta.row_group(rg).column(index[field.name]).statistics
            if stats is not None and stats.has_null_count:
                nulls += stats.null_count
        if nulls:
            raise WarehouseError(
                f"shard {url}: column {field.name} has {nulls} null values but must not be null;"
                " fix the step that wrote the shard"
            )
    return meta.num_rows


def _upsert(con: duckdb.DuckDBPyConnection, table: str, source: str, params: dict | None,
            deduplicated_source: str | None = None) -> tuple[dict, str]:
    """Upsert the rows of ``source`` (a FROM item) into ``table`` by the table's key.

    Rows whose key exists with identical content are left alone, changed ones are replaced, new
    ones inserted. When keys repeat within ``source``, ``deduplicated_source`` (the last row per
    key) is used instead. Returns the counts and the source used; the caller owns the transaction.
    """
    def run(sql: str) -> list[tuple]:
        return (con.execute(sql, params) if params is not None else con.execute(sql)).fetchall()

    columns = SHARD_SCHEMAS[table].names
    cols = ", ".join(columns)
    key = ", ".join(KEYS[table])
    on_key = " AND ".join(f"t.{k} = s.{k}" for k in KEYS[table])
    n_rows, n_keys = run(f"SELECT coalesce(sum(n), 0), count(*) FROM (SELECT count(*) AS n FROM {source} GROUP BY {key})")[0]
    if n_rows != n_keys:
        if deduplicated_source is None:
            raise WarehouseError(f"{table}: the input repeats keys ({key}); each row needs its own")
        source = deduplicated_source
    replaced = 0
    if first_row(con, f"SELECT 1 FROM {table} LIMIT 1"):  # nothing to replace in an empty table
        replaced = run(
            f"DELETE FROM {table} AS t USING (SELECT {cols} FROM {source}) AS s WHERE {on_key} AND "
            f"row({', '.join('t.' + c for c in columns)}) IS DISTINCT FROM row({', '.join('s.' + c for c in columns)})"
        )[0][0]
    inserted = run(
        f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {source} AS s "
        f"WHERE NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {on_key})"
    )[0][0]
    counts = {
        "rows": int(n_rows),
        "duplicate_keys": int(n_rows - n_keys),
        "inserted": inserted - replaced,
        "replaced": replaced,
        "unchanged": n_keys - inserted,
    }
    return counts, source


def _add_observed_relations(con: duckdb.DuckDBPyConnection, source: str, params: dict | None) -> int:
    """Relations in ``source`` that are neither canonical nor an alias yet join the vocabulary."""
    sql = f"""
        INSERT OR IGNORE INTO relations (relation, source, created_at)
        SELECT DISTINCT relation, 'observed', $observed_at FROM {source}
        WHERE relation NOT IN (SELECT alias FROM relation_aliases)
    """
    return con.execute(sql, (params or {}) | {"observed_at": utc_now()}).fetchall()[0][0]


def _load_shards(con: duckdb.DuckDBPyConnection, table: str, shard_urls: list[str], run_id: str) -> dict:
    urls = [os.fspath(u) for u in shard_urls]
    result = {"table": table, "shards": len(urls), "rows": 0, "duplicate_keys": 0,
              "inserted": 0, "replaced": 0, "unchanged": 0}
    if table == "triplets":
        result["new_relations"] = 0
    if not urls:
        return result
    if not run_id:
        raise WarehouseError(f"load into {table}: run_id must be non-empty")
    schema = SHARD_SCHEMAS[table]
    n_rows = [_shard_rows(u, schema, table) for u in urls]
    params = {"paths": [_duckdb_path(con, u) for u in urls]}
    # later shards win, and later rows within a shard, as if the shards were loaded one at a time
    numbered = " UNION ALL ".join(
        f"SELECT *, {i} AS shard_index FROM read_parquet($paths[{i + 1}], file_row_number = true)"
        for i in range(len(urls))
    )
    last_per_key = (
        f"(SELECT * FROM ({numbered}) QUALIFY row_number() OVER (PARTITION BY {', '.join(KEYS[table])} "
        f"ORDER BY shard_index DESC, file_row_number DESC) = 1)"
    )
    loaded_at = utc_now()
    with transaction(con):
        try:
            counts, source = _upsert(con, table, "read_parquet($paths)", params, last_per_key)
            result |= counts
            if table == "triplets":
                result["new_relations"] = _add_observed_relations(con, source, params)
        except (duckdb.ConstraintException, duckdb.ConversionException, duckdb.InvalidInputException) as e:
            where = urls[0] if len(urls) == 1 else f"{len(urls)} shards from {urls[0]}"
            raise WarehouseError(
                f"{table} shards ({where}) do not fit the warehouse: {_first_line(e)}; fix the step that wrote them"
            ) from None
        con.executemany(
            "INSERT INTO shard_loads VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT DO UPDATE SET n_rows = excluded.n_rows",
            [[table, u, run_id, n, loaded_at] for u, n in zip(urls, n_rows)],
        )
    con.execute("CHECKPOINT")  # into the main file, so the stock CLI sees it after we close
    return result


def load_documents(con: duckdb.DuckDBPyConnection, shard_urls: list[str], run_id: str) -> dict:
    """Upsert DOCUMENT_SCHEMA shards into ``documents`` by doc_id; reloading changes nothing.

    Returns counts: shards, rows, duplicate_keys, inserted, replaced, unchanged.
    """
    return _load_shards(con, "documents", shard_urls, run_id)


def load_annotated(con: duckdb.DuckDBPyConnection, shard_urls: list[str], run_id: str) -> dict:
    """Upsert ANNOTATED_SCHEMA shards into ``annotations`` by (doc_id, text_version, annotator,
    annotator_version); reloading changes nothing."""
    return _load_shards(con, "annotations", shard_urls, run_id)


def load_triplets(con: duckdb.DuckDBPyConnection, shard_urls: list[str], run_id: str) -> dict:
    """Upsert TRIPLET_SCHEMA shards into ``triplets`` by triplet_id; reloading changes nothing.

    Relations not seen before join the vocabulary (source 'observed'). Returns the counts of
    :func:`load_documents` plus new_relations.
    """
    return _load_shards(con, "triplets", shard_urls, run_id)


# --------------------------------------------------------------------------- inspecting


def table_checksum(con: duckdb.DuckDBPyConnection, table: str) -> str:
    """Order-independent hash of a table's rows (equal content, equal checksum, same DuckDB version)."""
    tables = {r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()}
    if table not in tables:
        raise WarehouseError(f"table_checksum: no table {table!r}; tables are {sorted(tables)}")
    n, total = con.execute(f'SELECT count(*), coalesce(sum(hash(t)), 0) FROM "{table}" AS t').fetchall()[0]
    return hashlib.sha1(f"{n}:{total}".encode()).hexdigest()


def stats(con: duckdb.DuckDBPyConnection) -> dict:
    """What is in the warehouse: rows per table, facts, conflicts, vocabulary, recent runs, file size."""
    tables = [r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() ORDER BY 1").fetchall()]
    counts = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchall()[0][0] for t in tables}
    path = database_path(con)
    size = sum(os.path.getsize(p) for p in (path, f"{path}.wal") if path and os.path.exists(p))
    runs = con.execute(
        "SELECT run_id, flow, status, code_version, started_at, finished_at FROM runs "
        "ORDER BY started_at DESC NULLS LAST LIMIT 10").fetchall()
    return {
        "path": path,
        "file_bytes": size,
        "schema_version": int(con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()[0][0]),
        "tables": counts,
        "facts": con.execute("SELECT count(*) FROM facts").fetchall()[0][0],
        "conflicts": con.execute("SELECT count(*) FROM conflicts").fetchall()[0][0],
        "entities": con.execute("SELECT count(DISTINCT entity) FROM facts").fetchall()[0][0],
        "relations": con.execute("SELECT count(*) FROM relation_stats WHERE n_triplets > 0").fetchall()[0][0],
        "runs": [dict(zip(("run_id", "flow", "status", "code_version", "started_at", "finished_at"), r))
                 for r in runs],
    }


def run_sql(
    path: str | os.PathLike, query: str, params: list | dict | None = None, write: bool = False
) -> tuple[list[str], list[tuple]]:
    """Run one query against the warehouse file and return (column names, rows).

    Parameters are bound (``?`` or ``$name``), never pasted into the SQL. Unless ``write``, the
    file is opened read-only and the query may not touch other files (no COPY, ATTACH, read_csv);
    a write statement then fails with a WarehouseError saying how to allow it.
    """
    con = connect(path, read_only=not write)
    try:
        if not write:
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        try:
            con.execute(query, params) if params is not None else con.execute(query)
            columns = [d[0] for d in con.description] if con.description else []
            rows = con.fetchall() if con.description else []
        except duckdb.Error as e:
            message = _first_line(e)
            if not write and ("read-only mode" in message or "file system operations are disabled" in message):
                raise WarehouseError(
                    f"read-only query refused: it writes, or touches files other than the warehouse {path}"
                    f" ({message}); pass write=True (lmlm warehouse sql --write) to allow it"
                ) from None
            raise WarehouseError(f"query failed: {message}") from None
        return columns, rows
    finally:
        con.close()

