"""The DuckDB warehouse of triplets with provenance: one file, DDL and views in ``warehouse/sql``.

Import the submodule you need; this package imports nothing itself:

- :mod:`warehouse.db`: connecting, loaders (idempotent upserts from shards), lineage (runs, the code
  version), stats and ad-hoc SQL.
- :mod:`warehouse.edits`: fact edits and aliases, audit-logged layers over the triplets.
- :mod:`warehouse.lookup_db`: export of the lookup database and import of the reference's JSON (the
  file formats belong to :mod:`lookup.files`).
"""
