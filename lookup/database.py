"""The lookup database: the facts a model may look up, one value per key, and the alias tables.

It is read from the files :mod:`lookup.files` describes (Parquet or reference JSON), from a
warehouse file (``.duckdb``, opened read-only through plain DuckDB), or from a DuckDB connection
to the warehouse: its ``facts`` view and its ``entity_aliases``/``relation_aliases`` tables.

Edits: after ``lmlm warehouse edit``, call :meth:`LookupDatabase.refresh` (it re-reads the file it
was loaded from, after a new export, or re-queries the warehouse); every index built on it follows
at its next lookup.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from lookup.files import read_reference_db
from lookup.keys import normalize_key
from schemas.errors import UserInputError
from schemas.markup import LookupCall, MarkupError

EDIT_SOURCE = "warehouse edit"  # what an edited value with no supporting document cites
WAREHOUSE_SUFFIX = ".duckdb"
# The lookup database's columns, as the warehouse's facts view gives them (edits applied).
FACTS_QUERY = "SELECT entity, relation, value, n_sources, doc_ids AS sources, source_urls, provenance FROM facts"


@dataclass(frozen=True)
class StoredFact:
    """One (entity, relation) -> value of the lookup database, with what cites it."""

    entity: str
    relation: str
    value: str
    n_sources: int = 0
    sources: tuple[str, ...] = ()  # source URLs when the warehouse has them, else document ids


def read_facts(source) -> list[StoredFact]:
    """Facts from a lookup-database Parquet file, a reference JSON file, or a DuckDB connection
    (its ``facts`` view). Raises UserInputError naming the file when it cannot be read."""
    if not isinstance(source, (str, os.PathLike)):
        return _facts_from_rows(source.sql(FACTS_QUERY).to_arrow_table().to_pylist(), "the warehouse's facts view")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise UserInputError(f"lookup database {path} not found; export it with `lmlm warehouse export-lookup-db`")
    if path.endswith(".json"):
        triplets, _ = read_reference_db(path)
        return _facts_from_rows([{"entity": e, "relation": r, "value": v} for e, r, v in triplets], path)
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise UserInputError(f"lookup database {path}: not a readable Parquet file ({e}); pass the .parquet "
                             "or .json that `lmlm warehouse export-lookup-db` wrote") from None
    missing = {"entity", "relation", "value"} - set(table.column_names)
    if missing:
        raise UserInputError(f"lookup database {path}: missing column(s) {sorted(missing)}; expected entity, "
                             "relation, value (and n_sources, sources, source_urls)")
    return _facts_from_rows(table.to_pylist(), path)


def _facts_from_rows(rows: list[dict], where: str) -> list[StoredFact]:
    facts = []
    for i, row in enumerate(rows):
        try:
            LookupCall(row["entity"], row["relation"], row["value"])  # the grammar's rules for a key and value
        except (MarkupError, TypeError) as e:
            raise UserInputError(f"lookup database {where}, row {i}: {e}; fix it in the warehouse and export again") from None
        cites = list(row.get("source_urls") or row.get("sources") or [])
        if row.get("provenance") == "edit" and not cites:
            cites = [EDIT_SOURCE]  # a value set by `lmlm warehouse edit` that no document states
        facts.append(StoredFact(row["entity"], row["relation"], row["value"],
                                int(row.get("n_sources") or len(row.get("sources") or [])), tuple(cites)))
    return facts


def read_aliases(source, kind: str) -> list[tuple[str, str]]:
    """(alias, canonical) pairs of an alias table: a Parquet file with columns (alias, entity) or
    (alias, relation), a DuckDB connection (its ``entity_aliases``/``relation_aliases`` table), or pairs."""
    if isinstance(source, (str, os.PathLike)):
        import pyarrow.parquet as pq

        path = os.fspath(source)
        try:
            table = pq.read_table(path, columns=["alias", kind])
        except Exception as e:
            raise UserInputError(f"{kind} alias table {path}: cannot read columns alias, {kind} ({e})") from None
        return list(zip(table.column("alias").to_pylist(), table.column(kind).to_pylist()))
    if hasattr(source, "sql"):
        return [tuple(r) for r in source.sql(f"SELECT alias, {kind} FROM {kind}_aliases").fetchall()]
    return [tuple(p) for p in source]


def connect_warehouse(path: str | os.PathLike):
    """A read-only DuckDB connection to a warehouse file; the caller closes it."""
    import duckdb

    path = os.fspath(path).removeprefix("file://")
    if not os.path.isfile(path):
        raise UserInputError(f"warehouse {path} not found; check the path or build it first (lmlm run)")
    try:
        return duckdb.connect(path, read_only=True)
    except duckdb.Error as e:
        if "could not set lock" in str(e).lower():
            raise UserInputError(f"warehouse {path} is open for writing by another process; "
                                 "wait for it to finish and retry") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(f"warehouse {path}: cannot open it ({reason})") from None


def _read(source, entity_aliases, relation_aliases):
    """(facts, entity alias pairs, relation alias pairs) from what :meth:`LookupDatabase.load` was given;
    a warehouse (file or connection) gives its own alias tables unless others are given."""
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(WAREHOUSE_SUFFIX):
        con = connect_warehouse(source)
        try:
            return _read(con, entity_aliases, relation_aliases)
        finally:
            con.close()
    if not isinstance(source, (str, os.PathLike)):
        entity_aliases = source if entity_aliases is None else entity_aliases
        relation_aliases = source if relation_aliases is None else relation_aliases
    return (read_facts(source), read_aliases(entity_aliases or (), "entity"),
            read_aliases(relation_aliases or (), "relation"))


class LookupDatabase:
    """The facts a model may look up, one value per normalised (entity, relation), and the alias tables.

    Where the warehouse holds several values for one key (see its ``conflicts`` view), the value with
    the most sources wins, ties broken by the smaller value, as the ``conflicts`` view orders them.
    """

    def __init__(self, facts: Iterable[StoredFact], entity_aliases: Iterable[tuple[str, str]] = (),
                 relation_aliases: Iterable[tuple[str, str]] = ()):
        self._sources: tuple | None = None
        self.version = 1  # bumped by every refresh that changes something; indexes rebuild on a change
        self._set(facts, entity_aliases, relation_aliases)

    @classmethod
    def load(cls, source, entity_aliases=None, relation_aliases=None) -> LookupDatabase:
        """Read a lookup database (Parquet/JSON path, warehouse ``.duckdb`` path or DuckDB connection)
        and optional alias tables (Parquet paths or pairs); from a warehouse the alias tables default
        to the warehouse's."""
        db = cls(*_read(source, entity_aliases, relation_aliases))
        db._sources = (source, entity_aliases, relation_aliases)
        return db

    def refresh(self) -> bool:
        """Re-read what :meth:`load` read (pick up edits); returns whether any fact or alias changed."""
        if self._sources is None:
            raise UserInputError("refresh: this lookup database was built in memory; build it with LookupDatabase.load")
        before = (self.facts, self.entity_aliases, self.relation_aliases)
        self._set(*_read(*self._sources))
        changed = before != (self.facts, self.entity_aliases, self.relation_aliases)
        self.version += changed
        return changed

    def _set(self, facts, entity_aliases, relation_aliases) -> None:
        best: dict[tuple[str, str], StoredFact] = {}
        for f in facts:
            key = (normalize_key(f.entity), normalize_key(f.relation))
            old = best.get(key)
            if old is None or (f.n_sources, _neg(f.value)) > (old.n_sources, _neg(old.value)):
                best[key] = f
        self.facts: dict[tuple[str, str], StoredFact] = best
        self.relations_of: dict[str, dict[str, StoredFact]] = {}  # normalised entity -> normalised relation -> fact
        for (e, r), f in best.items():
            self.relations_of.setdefault(e, {})[r] = f
        self.entity_aliases: dict[str, tuple[str, ...]] = {}  # normalised alias -> normalised entities
        for alias, entity in entity_aliases:
            targets = self.entity_aliases.setdefault(normalize_key(alias), ())
            if normalize_key(entity) not in targets:
                self.entity_aliases[normalize_key(alias)] = (*targets, normalize_key(entity))
        self.relation_aliases: dict[str, str] = {normalize_key(a): normalize_key(r) for a, r in relation_aliases}
        self.relation_names: dict[str, str] = {}  # normalised relation -> a name as stored
        for f in best.values():
            self.relation_names.setdefault(normalize_key(f.relation), f.relation)

    def __len__(self) -> int:
        return len(self.facts)


def _neg(s: str) -> tuple[int, ...]:
    """A sort key that orders strings in reverse (so max() picks the smallest)."""
    return tuple(-ord(c) for c in s) + (1,)
