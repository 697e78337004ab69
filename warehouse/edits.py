"""Decisions layered over the loaded triplets: fact edits and entity/relation aliases, audit-logged.

Triplets are never changed here; the views apply these layers, so reloading shards keeps every
decision, and removing a layer row brings back what the annotators said.
"""

from __future__ import annotations

import json
from typing import Literal

import duckdb

from schemas.markup import LookupCall, MarkupError
from warehouse.db import WarehouseError, current_user, first_row, transaction, utc_now

ALIAS_TABLES = {"entity": ("entity_aliases", "entity"), "relation": ("relation_aliases", "relation")}


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not name or name != name.strip():
        raise WarehouseError(f"{what} must be a non-empty string without surrounding spaces, got {name!r}")


def canonical_name(con: duckdb.DuckDBPyConnection, kind: Literal["entity", "relation"], name: str) -> str:
    """The canonical entity or relation name that ``name`` maps to (itself when it is no alias)."""
    table, column = ALIAS_TABLES[kind]
    row = first_row(con, f"SELECT {column} FROM {table} WHERE alias = ?", [name])
    return row[0] if row else name


def _audit(con, action: str, reason: str, actor: str, *, entity=None, relation=None, alias=None,
           old_value=None, new_value=None) -> int:
    return con.execute(
        "INSERT INTO audit_log (logged_at, actor, action, entity, relation, alias, old_value, new_value, reason) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING audit_id",
        [utc_now(), actor, action, entity, relation, alias, old_value, new_value, reason],
    ).fetchall()[0][0]


def edit_fact(
    con: duckdb.DuckDBPyConnection,
    entity: str,
    relation: str,
    value: str | None,
    reason: str,
    user: str | None = None,
) -> int:
    """Set the value of the fact (entity, relation), or delete it when ``value`` is None.

    Names are mapped through the alias tables first, so editing an alias edits its canonical fact.
    From then on the ``facts`` view shows only the new value (provenance 'edit') or, for a delete,
    nothing for that key; triplets stay as loaded. Returns the audit_log id of the edit.
    """
    _check_name("entity", entity)
    _check_name("relation", relation)
    if value is not None:
        try:
            LookupCall(entity, relation, value)  # the lookup grammar's rules for a value
        except MarkupError as e:
            raise WarehouseError(f"edit_fact: {e}") from None
    if not reason or not reason.strip():
        raise WarehouseError("edit_fact: give a reason (it goes to the audit log)")
    actor = user or current_user()
    with transaction(con):
        entity = canonical_name(con, "entity", entity)
        relation = canonical_name(con, "relation", relation)
        before = [r[0] for r in con.execute(
            "SELECT value FROM facts WHERE entity = ? AND relation = ? ORDER BY value", [entity, relation]
        ).fetchall()]
        if value is None and not before:
            raise WarehouseError(
                f"edit_fact: no fact ({entity!r}, {relation!r}) to delete; "
                "find it with: select * from facts where entity = ?"
            )
        audit_id = _audit(
            con, "delete_fact" if value is None else "set_fact", reason, actor,
            entity=entity, relation=relation, old_value=json.dumps(before, ensure_ascii=False), new_value=value,
        )
        con.execute(
            "INSERT OR REPLACE INTO fact_edits VALUES (?, ?, ?, ?, ?, ?, ?)",
            [entity, relation, value, reason, actor, utc_now(), audit_id],
        ).fetchall()
    return audit_id


def set_alias(
    con: duckdb.DuckDBPyConnection,
    kind: Literal["entity", "relation"],
    alias: str,
    canonical: str,
    reason: str,
    user: str | None = None,
    source: str = "person",
    reviewed: bool | None = None,
) -> int | None:
    """Map ``alias`` to the canonical entity or relation name ``canonical``; every view follows.

    ``reviewed`` defaults to True for source 'person' and False otherwise (a corrector's proposal).
    A reviewed mapping is only replaced by another reviewed one: the call then returns None and
    changes nothing. Mapping an alias to itself rejects it. Mappings stay one hop deep: the target
    is resolved first, and aliases that pointed at ``alias`` follow it. Returns the audit_log id.
    """
    if kind not in ALIAS_TABLES:
        raise WarehouseError(f"set_alias: kind must be 'entity' or 'relation', got {kind!r}")
    _check_name(f"{kind} alias", alias)
    _check_name(f"canonical {kind}", canonical)
    if not reason or not reason.strip():
        raise WarehouseError("set_alias: give a reason (it goes to the audit log)")
    reviewed = (source == "person") if reviewed is None else reviewed
    actor = user or current_user()
    table, column = ALIAS_TABLES[kind]
    with transaction(con):
        row = first_row(con, f"SELECT {column}, reviewed FROM {table} WHERE alias = ?", [alias])
        if row is not None and row[1] and not reviewed:
            return None  # a person's decision outlives later proposals
        target = alias if canonical == alias else canonical_name(con, kind, canonical)
        audit_id = _audit(
            con, f"set_{kind}_alias", reason, actor, alias=alias,
            old_value=row[0] if row else None, new_value=target, **{kind: target},
        )
        con.execute(
            f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?, ?, ?, ?, ?)",
            [alias, target, source, reviewed, actor, utc_now(), audit_id],
        ).fetchall()
        if target != alias:
            con.execute(f"UPDATE {table} SET {column} = ? WHERE {column} = ? AND alias <> ?",
                        [target, alias, alias]).fetchall()
        if kind == "relation":
            con.execute("INSERT OR IGNORE INTO relations (relation, source, created_at) VALUES (?, ?, ?)",
                        [target, source, utc_now()]).fetchall()
            if target != alias:  # an observed name that became an alias leaves the vocabulary
                con.execute("DELETE FROM relations WHERE relation = ? AND source = 'observed'", [alias]).fetchall()
    return audit_id
