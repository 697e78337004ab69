"""The warehouse side of the lookup database: export of the ``facts`` view, import of the reference's JSON.

The file formats (reference JSON, Parquet) belong to :mod:`lookup.files`; this module queries and
writes the warehouse, handing its rows to lookup's writers and taking a reference file from lookup's reader.
"""

from __future__ import annotations

import hashlib
import os

import duckdb
import pyarrow as pa

from lookup.database import FACTS_QUERY
from lookup.files import read_reference_db, write_lookup_parquet, write_reference_db
from schemas.errors import UserInputError
from schemas.shards import TRIPLET_SCHEMA, triplet_id
from warehouse.db import (
    WarehouseError,
    _add_observed_relations,
    _upsert,
    code_version,
    record_run,
    transaction,
    utc_now,
)

IMPORT_ANNOTATOR = "reference-import"


def export_lookup_db(
    con: duckdb.DuckDBPyConnection, json_path: str | None = None, parquet_path: str | None = None
) -> dict:
    """Write the current facts (edits applied) as the reference's JSON database and/or as Parquet.

    Triplets are sorted by (entity, relation, value); the name lists are sorted and distinct.
    Returns the counts written and the paths.
    """
    facts = con.sql(f"{FACTS_QUERY} ORDER BY entity, relation, value").to_arrow_table()
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
        write_reference_db(json_path, list(zip(entities, relations, values)))
    if parquet_path:
        write_lookup_parquet(parquet_path, facts)
    return result


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
    try:
        triplets, raw = read_reference_db(json_path)
    except UserInputError as e:
        raise WarehouseError(str(e)) from None
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
                           code_version(), "COMPLETED", counts=result, started_at=started_at, finished_at=utc_now())
    finally:
        con.unregister("_reference_triplets")
    con.execute("CHECKPOINT").fetchall()
    return result
