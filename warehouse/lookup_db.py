"""The lookup database a model consults: export from the ``facts`` view, import of the reference's JSON.

Reference JSON format (kilian-group/LMLM): ``{"entities": [...], "relationships": [...],
"return_values": [...], "triplets": [[entity, relation, value], ...]}``. The Parquet form has one
row per fact with its provenance: entity, relation, value, n_sources, sources (doc ids),
source_urls, provenance ('observed' or 'edit').
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata

import duckdb
import fsspec
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.markup import LookupCall, MarkupError
from schemas.shards import SHARD_COMPRESSION, TRIPLET_SCHEMA, triplet_id
from warehouse.db import (
    WarehouseError,
    _add_observed_relations,
    _upsert,
    record_run,
    transaction,
    utc_now,
)

IMPORT_ANNOTATOR = "reference-import"


def _write_file(path: str, write) -> None:
    """Call ``write(binary file)`` for ``path``; local files appear whole or not at all."""
    if "://" in path and not path.startswith("file://"):
        with fsspec.open(path, "wb") as f:
            write(f)
        return
    path = path.removeprefix("file://")
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_lookup_db(
    con: duckdb.DuckDBPyConnection, json_path: str | None = None, parquet_path: str | None = None
) -> dict:
    """Write the current facts (edits applied) as the reference's JSON database and/or as Parquet.

    Triplets are sorted by (entity, relation, value); the name lists are sorted and distinct.
    Returns the counts written and the paths.
    """
    facts = con.sql(
        "SELECT entity, relation, value, n_sources, doc_ids AS sources, source_urls, provenance "
        "FROM facts ORDER BY entity, relation, value"
    ).to_arrow_table()
    entities, relations, values = (facts.column(c).to_pylist() for c in ("entity", "relation", "value"))
    result = {
        "facts": facts.num_rows,
        "entities": len(set(entities)),
        "relations": len(set(relations)),
        "values": len(set(values)),
        "json": json_path,
        "parquet": parquet_path,
    }
    if json_path:
        document = {
            "entities": sorted(set(entities)),
            "relationships": sorted(set(relations)),
            "return_values": sorted(set(values)),
            "triplets": [list(t) for t in zip(entities, relations, values)],
        }
        _write_file(os.fspath(json_path), lambda f: f.write(orjson.dumps(document)))
    if parquet_path:
        _write_file(os.fspath(parquet_path), lambda f: pq.write_table(facts, f, compression=SHARD_COMPRESSION))
    return result


def _code_version() -> str:
    try:
        return metadata.version("lmlm-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def read_reference_db(json_path: str) -> tuple[list[list[str]], bytes]:
    """The triplets of a reference JSON database (checked against the lookup grammar) and its bytes."""
    try:
        with fsspec.open(os.fspath(json_path), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise WarehouseError(f"reference database {json_path} not found; check the path") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise WarehouseError(f"reference database {json_path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("triplets"), list):
        raise WarehouseError(
            f"reference database {json_path}: expected an object with a 'triplets' list"
            ' ({"entities", "relationships", "return_values", "triplets"})'
        )
    for i, t in enumerate(data["triplets"]):
        if not (isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) for x in t)):
            raise WarehouseError(
                f"reference database {json_path}: triplets[{i}] must be [entity, relation, value] strings,"
                f" got {str(t)[:80]}"
            )
        try:
            LookupCall(*t)
        except MarkupError as e:
            raise WarehouseError(f"reference database {json_path}: triplets[{i}]: {e}") from None
    return data["triplets"], raw


def import_reference_db(con: duckdb.DuckDBPyConnection, json_path: str, run_id: str) -> dict:
    """Load a reference JSON database as the triplets of one pseudo-document, ``import:<file name>``.

    Triplets get annotator 'reference-import', annotator_version = the file's content hash,
    call_offset = their position in the file and no spans. Re-importing the same file changes
    nothing; importing a changed file with the same name replaces the earlier import's triplets.
    Records a run for ``run_id`` unless one exists.
    """
    if not run_id:
        raise WarehouseError("import_reference_db: run_id must be non-empty")
    started_at = utc_now()
    json_path = os.fspath(json_path)
    triplets, raw = read_reference_db(json_path)
    doc_id = f"import:{json_path.rstrip('/').rsplit('/', 1)[-1]}"
    version = hashlib.sha1(raw).hexdigest()[:12]
    n = len(triplets)
    entities, relations, values = ([t[k] for t in triplets] for k in range(3))
    table = pa.table(
        {
            "triplet_id": [triplet_id(doc_id, i, *t, IMPORT_ANNOTATOR) for i, t in enumerate(triplets)],
            "doc_id": [doc_id] * n,
            "entity": entities,
            "relation": relations,
            "value": values,
            "call_offset": list(range(n)),
            "value_start": [None] * n,
            "value_end": [None] * n,
            "source_url": [None] * n,
            "annotator": [IMPORT_ANNOTATOR] * n,
            "annotator_version": [version] * n,
            "prompt_id": [None] * n,
            "run_id": [run_id] * n,
            "confidence": [None] * n,
        },
        schema=TRIPLET_SCHEMA,
    )
    con.register("_reference_triplets", table)
    try:
        with transaction(con):
            result = {"table": "triplets", "doc_id": doc_id}
            result |= _upsert(con, "triplets", "_reference_triplets", None)[0]
            result["removed"] = con.execute(
                "DELETE FROM triplets WHERE doc_id = ? AND triplet_id NOT IN (SELECT triplet_id FROM _reference_triplets)",
                [doc_id],
            ).fetchall()[0][0]
            result["new_relations"] = _add_observed_relations(con, "_reference_triplets", None)
            con.execute(
                "INSERT INTO shard_loads VALUES ('triplets', ?, ?, ?, ?) ON CONFLICT DO UPDATE SET n_rows = excluded.n_rows",
                [json_path, run_id, n, utc_now()],
            ).fetchall()
            if con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0] == 0:
                record_run(con, run_id, "import_reference_db", {"json_path": json_path}, [json_path],
                           _code_version(), "COMPLETED", counts=result, started_at=started_at, finished_at=utc_now())
    finally:
        con.unregister("_reference_triplets")
    con.execute("CHECKPOINT").fetchall()
    return result
