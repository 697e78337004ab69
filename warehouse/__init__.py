"""The DuckDB warehouse of triplets with provenance: one file, DDL and views in ``warehouse/sql``.

Loaders (idempotent upserts from shards), lineage, stats and SQL live in :mod:`warehouse.db`;
fact edits and aliases (audit-logged layers over the triplets) in :mod:`warehouse.edits`; export
and import of the lookup database in :mod:`warehouse.lookup_db`.
"""

from warehouse.db import (
    WarehouseBusyError,
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
from warehouse.edits import canonical_name, edit_fact, set_alias
from warehouse.lookup_db import export_lookup_db, import_reference_db

__all__ = [
    "WarehouseBusyError", "WarehouseError", "canonical_name", "connect", "edit_fact", "export_lookup_db",
    "import_reference_db", "load_annotated", "load_documents", "load_triplets",
    "record_run", "run_sql", "set_alias", "stats", "table_checksum",
]
