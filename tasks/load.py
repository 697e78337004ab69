"""Loading shards into the DuckDB warehouse, with run lineage."""

from __future__ import annotations

from datetime import datetime, timezone

from schemas.reports import WarehouseLoad, WarehouseLoadReport
from warehouse import db
from warehouse.db import code_version
from warehouse.edits import set_alias


def propose_aliases(con, kind: str, proposals: list[dict]) -> int:
    """Store a corrector's alias proposals for review; an unchanged or reviewed mapping is left alone."""
    table, column = {"relation": ("relation_aliases", "relation"), "entity": ("entity_aliases", "entity")}[kind]
    current = {a: (c, r) for a, c, r in con.execute(f"SELECT alias, {column}, reviewed FROM {table}").fetchall()}
    stored = 0
    for p in proposals:
        have = current.get(p["alias"])
        if p["alias"] == p["canonical"] or (have and (have[1] or have[0] == p["canonical"])):
            continue
        if set_alias(con, kind, p["alias"], p["canonical"], source=p.get("source", "rule"), reviewed=False,
                     reason=f"corrector proposal ({p.get('source', 'rule')}, score {p.get('score')})") is not None:
            stored += 1
    return stored


def reviewed_overrides(path: str, wait_s: float = 0.0) -> tuple[dict[str, str], dict[str, str]]:
    """Reviewed relation and entity alias mappings from the warehouse (empty when it does not exist yet);
    waits up to ``wait_s`` seconds while another process writes it."""
    import os

    if not os.path.exists(path):
        return {}, {}
    con = db.connect(path, read_only=True, wait_s=wait_s)
    try:
        rel = dict(con.execute("SELECT alias, relation FROM relation_aliases WHERE reviewed").fetchall())
        ent = dict(con.execute("SELECT alias, entity FROM entity_aliases WHERE reviewed").fetchall())
    finally:
        con.close()
    return rel, ent


def load_warehouse(path: str, load: WarehouseLoad, wait_s: float = 0.0) -> WarehouseLoadReport:
    """Load ``load``'s shards idempotently, store its alias proposals, and record its run.

    One writer at a time: while another process writes the file, waits up to ``wait_s`` seconds, then
    raises WarehouseBusyError. Each table loads in one transaction, so a killed load leaves the file
    as it was before that table.
    """
    started = datetime.now(timezone.utc)
    run = load.run
    con = db.connect(path, wait_s=wait_s)
    try:
        db.record_run(con, run.run_id, run.flow, run.config, run.inputs, code_version(), status="loading",
                      started_at=started)
        counts = {
            "documents_loaded": db.load_documents(con, load.documents, run.run_id),
            "annotations_loaded": db.load_annotated(con, load.annotated, run.run_id),
            "triplets_loaded": db.load_triplets(con, load.triplets, run.run_id),
            "relation_aliases_proposed": propose_aliases(con, "relation", load.relation_aliases),
            "entity_aliases_proposed": propose_aliases(con, "entity", load.entity_aliases),
        }
        summary = db.stats(con)
        counts.update(documents=summary["tables"]["documents"], triplets=summary["tables"]["triplets"],
                      facts=summary["facts"], conflicts=summary["conflicts"])
        db.record_run(con, run.run_id, run.flow, run.config, run.inputs, code_version(), status="loaded",
                      counts=counts, started_at=started, finished_at=datetime.now(timezone.utc))
        return WarehouseLoadReport(**counts)
    finally:
        con.close()
