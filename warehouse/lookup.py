"""Lookup indexes over the lookup database: exact, fuzzy (embeddings) and a key prefix tree.

The lookup database is what :func:`warehouse.lookup_db.export_lookup_db` writes (Parquet: entity,
relation, value, n_sources, sources, source_urls; or the reference JSON), or the warehouse's
``facts`` view read directly through a connection, together with the entity and relation alias
tables. :class:`LookupDatabase` holds one value per key; the indexes answer ``lookup(entity,
relation)`` with a :class:`LookupResult` whose value is ``"unknown"`` on a miss.

- :class:`ExactIndex`: the normalised key (casefold, collapsed whitespace, no punctuation at the
  ends), with names mapped through the alias tables.
- :class:`FuzzyIndex`, ``mode="flat"``: the reference's lookup, cosine >= 0.6 between the
  all-MiniLM-L6-v2 embeddings of ``"entity relation"`` strings, top-1.
- :class:`FuzzyIndex`, ``mode="entity-first"``: resolve the entity (exact, alias, then a name
  variant: same first and last word, a middle part dropped or added; or a near-identical
  embedding), then the relation among that entity's own relations (exact, alias, the relation
  vocabulary, then embeddings with a margin over the relations the entity lacks). A key absent
  from the database answers ``unknown`` instead of its nearest neighbour's value.
- :class:`KeyTrie`: the tokenized keys, for decoding that can only produce keys in the database.

Edits: after ``lmlm warehouse edit``, call :meth:`LookupDatabase.refresh` (it re-reads the Parquet
or JSON it was loaded from, after a new export, or re-queries the connection it was read from);
every index built on it follows at its next lookup, embedding only names it has not seen.

The embedding function is injected (``embed(texts) -> L2-normalised float32 array``), e.g.
``models.embed.embed``; this module never loads a model itself.
"""

from __future__ import annotations

import bisect
import logging
import os
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from schemas.errors import UserInputError
from schemas.markup import DB_RELATIONSHIP, DB_RETURN, LookupCall, MarkupError

log = logging.getLogger(__name__)

UNKNOWN = "unknown"  # the value a miss returns, as in the reference
Embed = Callable[[list[str]], np.ndarray]
# Relation names are embedded as they are and as a question, averaged: a question gives the
# encoder the sense of a short relation name ("Born On" -> "What is the Born On?").
RELATION_TEMPLATES = ("{}", "What is the {}?")
QUERY_CACHE_SIZE = 100_000  # query strings whose embeddings are kept
EDIT_SOURCE = "warehouse edit"  # what an edited value with no supporting document cites


def normalize_key(text: str) -> str:
    """The exact-match form of a name: NFKC, casefolded, whitespace collapsed, punctuation stripped at the ends."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]).startswith("P")):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[start:end]


def name_words(normalized: str) -> tuple[str, ...]:
    """The words of a normalised name, each without punctuation at its ends ("j." -> "j")."""
    return tuple(w for w in (normalize_key(w) for w in normalized.split()) if w)


def is_name_variant(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two names (as words) are the same name with a middle part dropped or added.

    Same first word, same last word, and the shorter's words appear in order in the longer's:
    "john smith" ~ "john michael smith", but not "andrea jones" ~ "john andrea jones".
    """
    if len(a) < 2 or len(b) < 2 or a[0] != b[0] or a[-1] != b[-1]:
        return False
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    rest = iter(long)
    return all(w in rest for w in short)


@dataclass(frozen=True)
class Fact:
    """One (entity, relation) -> value of the lookup database, with what cites it."""

    entity: str
    relation: str
    value: str
    n_sources: int = 0
    sources: tuple[str, ...] = ()  # source URLs when the warehouse has them, else document ids


@dataclass(frozen=True)
class LookupResult:
    """The answer to one lookup. On a miss ``value`` is ``"unknown"`` and ``hit`` is False;
    ``entity``/``relation`` are the database's names for what was resolved (None if nothing was)."""

    value: str
    entity: str | None
    relation: str | None
    score: float  # 1.0 for an exact or alias match, else the deciding cosine
    sources: list[str] = field(default_factory=list)
    hit: bool = False

    @classmethod
    def of(cls, fact: Fact, score: float = 1.0) -> LookupResult:
        return cls(fact.value, fact.entity, fact.relation, score, list(fact.sources), True)

    @classmethod
    def miss(cls, entity: str | None = None, relation: str | None = None, score: float = 0.0) -> LookupResult:
        return cls(UNKNOWN, entity, relation, score, [], False)


def read_facts(source) -> list[Fact]:
    """Facts from a lookup-database Parquet file, a reference JSON file, or a DuckDB connection
    (its ``facts`` view). Raises UserInputError naming the file when it cannot be read."""
    if not isinstance(source, (str, os.PathLike)):
        return _facts_from_rows(source.sql(
            "SELECT entity, relation, value, n_sources, doc_ids AS sources, source_urls, provenance FROM facts"
        ).to_arrow_table().to_pylist(), "the warehouse's facts view")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise UserInputError(f"lookup database {path} not found; export it with `lmlm warehouse export-lookup-db`")
    if path.endswith(".json"):
        from warehouse.lookup_db import WarehouseError, read_reference_db

        try:
            triplets, _ = read_reference_db(path)
        except WarehouseError as e:
            raise UserInputError(str(e)) from None
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


def _facts_from_rows(rows: list[dict], where: str) -> list[Fact]:
    facts = []
    for i, row in enumerate(rows):
        try:
            LookupCall(row["entity"], row["relation"], row["value"])  # the grammar's rules for a key and value
        except (MarkupError, TypeError) as e:
            raise UserInputError(f"lookup database {where}, row {i}: {e}; fix it in the warehouse and export again") from None
        cites = list(row.get("source_urls") or row.get("sources") or [])
        if row.get("provenance") == "edit" and not cites:
            cites = [EDIT_SOURCE]  # a value set by `lmlm warehouse edit` that no document states
        facts.append(Fact(row["entity"], row["relation"], row["value"],
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


class LookupDatabase:
    """The facts a model may look up, one value per normalised (entity, relation), and the alias tables.

    Where the warehouse holds several values for one key (see its ``conflicts`` view), the value with
    the most sources wins, ties broken by the smaller value, as the ``conflicts`` view orders them.
    """

    def __init__(self, facts: Iterable[Fact], entity_aliases: Iterable[tuple[str, str]] = (),
                 relation_aliases: Iterable[tuple[str, str]] = ()):
        self._sources: tuple | None = None
        self.version = 1  # bumped by every refresh that changes something; indexes rebuild on a change
        self._set(facts, entity_aliases, relation_aliases)

    @classmethod
    def load(cls, source, entity_aliases=None, relation_aliases=None) -> LookupDatabase:
        """Read a lookup database (Parquet/JSON path or DuckDB connection) and optional alias tables
        (Parquet paths or pairs); with a connection the alias tables default to the warehouse's."""
        is_con = not isinstance(source, (str, os.PathLike))
        if is_con:
            entity_aliases = source if entity_aliases is None else entity_aliases
            relation_aliases = source if relation_aliases is None else relation_aliases
        db = cls(read_facts(source), read_aliases(entity_aliases or (), "entity"),
                 read_aliases(relation_aliases or (), "relation"))
        db._sources = (source, entity_aliases, relation_aliases)
        return db

    def refresh(self) -> bool:
        """Re-read what :meth:`load` read (pick up edits); returns whether any fact or alias changed."""
        if self._sources is None:
            raise UserInputError("refresh: this lookup database was built in memory; build it with LookupDatabase.load")
        source, ea, ra = self._sources
        before = (self.facts, self.entity_aliases, self.relation_aliases)
        self._set(read_facts(source), read_aliases(ea or (), "entity"), read_aliases(ra or (), "relation"))
        changed = before != (self.facts, self.entity_aliases, self.relation_aliases)
        self.version += changed
        return changed

    def _set(self, facts, entity_aliases, relation_aliases) -> None:
        best: dict[tuple[str, str], Fact] = {}
        for f in facts:
            key = (normalize_key(f.entity), normalize_key(f.relation))
            old = best.get(key)
            if old is None or (f.n_sources, _neg(f.value)) > (old.n_sources, _neg(old.value)):
                best[key] = f
        self.facts: dict[tuple[str, str], Fact] = best
        self.relations_of: dict[str, dict[str, Fact]] = {}  # normalised entity -> normalised relation -> fact
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


def _resolve_exact_entity(db: LookupDatabase, entity: str) -> tuple[str, ...]:
    """Normalised database entities that ``entity`` names exactly or through the alias table."""
    e = normalize_key(entity)
    if e in db.relations_of:
        return (e,)
    return tuple(x for x in db.entity_aliases.get(e, ()) if x in db.relations_of)


def _resolve_exact_relation(db: LookupDatabase, entity: str, relation: str) -> Fact | None:
    rels = db.relations_of[entity]
    r = normalize_key(relation)
    return rels.get(r) or rels.get(db.relation_aliases.get(r, ""))


class ExactIndex:
    """Exact lookups of the normalised key, entity and relation mapped through the alias tables.

    An alias that names several entities answers only when exactly one of them has the relation.
    """

    def __init__(self, db: LookupDatabase):
        self.db = db

    def lookup(self, entity: str, relation: str) -> LookupResult:
        entities = _resolve_exact_entity(self.db, entity)
        found = [f for f in (_resolve_exact_relation(self.db, e, relation) for e in entities) if f]
        if len(found) == 1:
            return LookupResult.of(found[0])
        return LookupResult.miss(_entity_name(self.db, entities[0]) if len(entities) == 1 else None)

    def lookup_batch(self, keys: Sequence[tuple[str, str]]) -> list[LookupResult]:
        return [self.lookup(e, r) for e, r in keys]


def _entity_name(db: LookupDatabase, entity: str) -> str:
    return next(iter(db.relations_of[entity].values())).entity


# HNSW graph parameters, measured by `bench/lookup.py speed` (one thread, one query at a time): over
# the 102,500 entity names of a 1M-key database, efSearch 160 agrees with exact flat search on 99.5%
# of top-1s in about 0.8 ms; building with efConstruction 200 (not 80) is what lets a small
# efSearch agree (80: 0.986 at efSearch 128 on 100k real keys; 200: 0.995).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 160


class VectorIndex:
    """Top-k inner-product search over L2-normalised vectors (cosine): exact flat search, or an
    approximate HNSW graph (faiss; parameters above) for large sets, as FuzzyIndex picks by size."""

    def __init__(self, dim: int, kind: str = "flat", *, hnsw_m: int = HNSW_M,
                 ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH):
        import faiss

        if kind not in ("flat", "hnsw"):
            raise UserInputError(f"vector index kind {kind!r}: use 'flat' or 'hnsw'")
        self.kind = kind
        if kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        else:
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = ef_construction
            self.index.hnsw.efSearch = ef_search

    def add(self, vectors: np.ndarray) -> None:
        if len(vectors):
            self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, k), best first; ids are -1 where fewer than k exist."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def vectors(self) -> np.ndarray:
        return self.index.reconstruct_n(0, self.index.ntotal)

    def nbytes(self) -> int:
        """Memory the index holds (vectors, and the graph for HNSW), measured by serialising it."""
        import faiss

        return int(faiss.serialize_index(self.index).nbytes)

    def __len__(self) -> int:
        return self.index.ntotal


class _EmbeddedNames:
    """Names embedded once each, searchable by cosine; names only grow, so an edit that removes
    an entity never forces a rebuild (searches skip names the caller no longer knows)."""

    def __init__(self, embed: Embed, kind: str, hnsw_min: int, templates: tuple[str, ...] = ("{}",)):
        self.embed, self.kind, self.hnsw_min, self.templates = embed, kind, hnsw_min, templates
        self.row: dict[str, int] = {}
        self.names: list[str] = []
        self.index: VectorIndex | None = None
        self._queries: dict[str, np.ndarray] = {}

    def vectors_of(self, texts: list[str]) -> np.ndarray:
        """Embeddings of ``texts`` (the templates' average), in one call to the encoder."""
        n = len(texts)
        vecs = np.asarray(self.embed([t.format(x) for t in self.templates for x in texts]), dtype=np.float32)
        vecs = vecs.reshape(len(self.templates), n, -1).sum(axis=0)
        return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)

    def query_vectors(self, texts: list[str]) -> np.ndarray:
        """Like :meth:`vectors_of`, remembering recent queries (a model repeats its own wording)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._queries]
        if missing:
            if len(self._queries) + len(missing) > QUERY_CACHE_SIZE:
                self._queries.clear()
            self._queries.update(zip(missing, self.vectors_of(missing)))
        return np.stack([self._queries[t] for t in texts])

    def add(self, names: Iterable[str]) -> None:
        new = [n for n in dict.fromkeys(names) if n not in self.row]
        if not new:
            return
        vecs = self.vectors_of(new)
        kind = self.kind if self.kind != "auto" else ("hnsw" if len(self.names) + len(new) >= self.hnsw_min else "flat")
        if self.index is None or self.index.kind != kind:
            old = self.index.vectors() if self.index is not None and len(self.index) else None
            self.index = VectorIndex(vecs.shape[1], kind)
            if old is not None:
                self.index.add(old)
        self.index.add(vecs)
        for n in new:
            self.row[n] = len(self.names)
            self.names.append(n)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None or not len(self.index):
            return np.full((len(queries), 0), -1.0), np.full((len(queries), 0), -1)
        return self.index.search(queries, min(k, len(self.index)))


class FuzzyIndex:
    """Embedding lookups; see the module docstring for the two modes.

    ``threshold`` is the flat mode's cosine cut-off (the reference's 0.6). Entity-first mode uses
    ``entity_threshold`` (cosine above which a name that is no name variant is still taken as the
    entity, e.g. reordered words), ``relation_threshold`` and ``margin`` (the relation's cosine must
    beat every relation the entity lacks by this much). ``vector_index``: "flat" (exact), "hnsw",
    or "auto" (HNSW from ``hnsw_min`` vectors on).
    """

    def __init__(self, db: LookupDatabase, embed: Embed, mode: str = "entity-first", threshold: float = 0.6, *,
                 entity_threshold: float = 0.95, relation_threshold: float = 0.45, margin: float = 0.03,
                 vector_index: str = "auto", hnsw_min: int = 50_000, candidates: int = 10):
        if mode not in ("entity-first", "flat"):
            raise UserInputError(f"fuzzy lookup mode {mode!r}: use 'entity-first' or 'flat'")
        if vector_index not in ("auto", "flat", "hnsw"):
            raise UserInputError(f"vector_index {vector_index!r}: use 'auto', 'flat' or 'hnsw'")
        self.db, self.mode, self.threshold = db, mode, threshold
        self.entity_threshold, self.relation_threshold, self.margin = entity_threshold, relation_threshold, margin
        self.candidates = candidates
        self.names = _EmbeddedNames(embed, vector_index, hnsw_min)  # entity names, or "entity relation" keys
        self.relations = _EmbeddedNames(embed, "flat", hnsw_min, RELATION_TEMPLATES)
        self._version = -1

    def _sync(self) -> None:
        """Follow the database after a refresh, embedding only names not seen before."""
        if self._version == self.db.version:
            return
        db = self.db
        if self.mode == "flat":
            self._keys = {f"{f.entity} {f.relation}": f for f in db.facts.values()}
            self.names.add(self._keys)
        else:
            self._entity_of = {_entity_name(db, e): e for e in db.relations_of}
            self.names.add(self._entity_of)
            # (first word, last word) -> [(entity, its words)], where name variants are found
            self._by_ends: dict[tuple[str, str], list[tuple[str, tuple[str, ...]]]] = {}
            for e in db.relations_of:
                w = name_words(e)
                if len(w) >= 2:
                    self._by_ends.setdefault((w[0], w[-1]), []).append((e, w))
            self.relations.add(db.relation_names.values())
            self._vocabulary_keys = list(db.relation_names)
            rows = [self.relations.row[n] for n in db.relation_names.values()]
            self._relation_vectors = self.relations.index.vectors()[rows] if rows else np.zeros((0, 1), np.float32)
        self._version = db.version

    def lookup(self, entity: str, relation: str) -> LookupResult:
        return self.lookup_batch([(entity, relation)])[0]

    def lookup_batch(self, keys: Sequence[tuple[str, str]]) -> list[LookupResult]:
        """One result per (entity, relation) key, embedding each distinct query string once."""
        self._sync()
        if not keys:
            return []
        if self.mode == "flat":
            return self._flat(keys)
        candidates = self._resolve_entities([e for e, _ in keys])
        # relation names the vocabulary does not know are resolved by embedding
        novel = sorted({normalize_key(r) for (_, r), c in zip(keys, candidates) if c and self._known_relation(r) is None})
        vectors = dict(zip(novel, self.relations.query_vectors(novel))) if novel else {}
        return [self._answer(c, relation, vectors) for (_, relation), c in zip(keys, candidates)]

    def _known_relation(self, relation: str) -> str | None:
        """The normalised vocabulary relation ``relation`` names exactly or through an alias, if any."""
        r = normalize_key(relation)
        r = r if r in self.db.relation_names else self.db.relation_aliases.get(r)
        return r if r in self.db.relation_names else None

    def _answer(self, candidates: list[tuple[str, float]], relation: str, vectors: dict) -> LookupResult:
        """The value when the candidate entities agree on one; a miss when none has the relation or they disagree."""
        known = self._known_relation(relation)
        hits = []
        for entity, e_score in candidates:
            own = self.db.relations_of[entity]
            if known is not None:
                if known in own:
                    hits.append(LookupResult.of(own[known], e_score))
            else:
                result = self._relation_by_embedding(entity, vectors[normalize_key(relation)], e_score)
                if result.hit:
                    hits.append(result)
        if len({h.value for h in hits}) == 1:
            return max(hits, key=lambda h: h.score)
        if len(candidates) == 1 and not hits:
            return LookupResult.miss(_entity_name(self.db, candidates[0][0]))
        return LookupResult.miss()

    def _flat(self, keys) -> list[LookupResult]:
        queries = [f"{e} {r}" for e, r in keys]
        distinct = list(dict.fromkeys(queries))
        scores, ids = self.names.search(self.names.query_vectors(distinct), self.candidates)
        best = {}
        for q, s_row, i_row in zip(distinct, scores, ids):
            live = [(float(s), self._keys[self.names.names[i]]) for s, i in zip(s_row, i_row)
                    if i >= 0 and self.names.names[i] in self._keys]
            best[q] = live[0] if live else (0.0, None)
        out = []
        for q in queries:
            score, fact = best[q]
            out.append(LookupResult.of(fact, score) if fact and score >= self.threshold else LookupResult.miss(score=score))
        return out

    def _resolve_entities(self, names: list[str]) -> list[list[tuple[str, float]]]:
        """Per query name, the normalised database entities it may mean, with a score: the exact or
        alias match; else its name variants; else a near-identical embedding clearly ahead of the next."""
        out: list[list[tuple[str, float]]] = [[] for _ in names]
        fuzzy: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            exact = _resolve_exact_entity(self.db, name)
            if exact:
                out[i] = [(e, 1.0) for e in exact]
                continue
            n = normalize_key(name)
            words = name_words(n)
            if len(words) >= 2:
                out[i] = [(e, 1.0) for e, w in self._by_ends.get((words[0], words[-1]), ()) if is_name_variant(words, w)]
            if not out[i] and n:
                fuzzy.setdefault(n, []).append(i)
        if fuzzy:
            queries = list(fuzzy)
            scores, ids = self.names.search(self.names.query_vectors(queries), self.candidates)
            for q, s_row, i_row in zip(queries, scores, ids):
                live = [(float(s), self._entity_of[self.names.names[j]]) for s, j in zip(s_row, i_row)
                        if j >= 0 and self.names.names[j] in self._entity_of]
                if live and live[0][0] >= self.entity_threshold and (len(live) == 1 or live[0][0] - live[1][0] >= self.margin):
                    for i in fuzzy[q]:
                        out[i] = [(live[0][1], live[0][0])]
        return out

    def _relation_by_embedding(self, entity: str, vec: np.ndarray, e_score: float) -> LookupResult:
        """The entity's relation nearest to ``vec``, if close enough and clearly nearer than any relation it lacks."""
        own = self.db.relations_of[entity]
        sims = self._relation_vectors @ vec
        is_own = np.fromiter((k in own for k in self._vocabulary_keys), dtype=bool, count=len(self._vocabulary_keys))
        best_own = int(np.argmax(np.where(is_own, sims, -2.0)))
        other = float(np.max(sims[~is_own])) if (~is_own).any() else -1.0
        score = float(sims[best_own])
        if score >= self.relation_threshold and score - other >= self.margin:
            return LookupResult.of(own[self._vocabulary_keys[best_own]], min(score, e_score))
        return LookupResult.miss(_entity_name(self.db, entity), None, score)


class KeyTrie:
    """The database's keys as token sequences (what follows ``<|db_entity|>`` up to and including
    ``<|db_return|>``), for constrained decoding: :meth:`allowed_next` gives the token ids that
    continue a partial call towards some key. Lookups of completed keys are exact.

    Keys are tokenized as " {entity}<|db_relationship|> {relation}<|db_return|>", the form
    :func:`schemas.markup.render_call` writes, with the names as stored in the database.
    """

    def __init__(self, db: LookupDatabase, tokenizer):
        self.db, self.tokenizer = db, tokenizer
        self.exact = ExactIndex(db)
        self._encoded: dict[tuple[str, str], str] = {}
        self._version = -1

    def _sync(self) -> None:
        if self._version == self.db.version:
            return
        keys = [(f.entity, f.relation) for f in self.db.facts.values()]
        new = [k for k in keys if k not in self._encoded]
        if new:
            ids = self.tokenizer([f" {e}{DB_RELATIONSHIP} {r}{DB_RETURN}" for e, r in new], add_special_tokens=False)["input_ids"]
            for k, seq in zip(new, ids):
                self._encoded[k] = _as_str(seq)
        # sorted token strings: the keys extending a prefix form one contiguous run
        self._sorted = sorted({self._encoded[k] for k in keys})
        self._allowed: dict[str, list[int]] = {}  # answers so far; the short prefixes are the costly ones
        self._version = self.db.version

    def allowed_next(self, prefix: Sequence[int]) -> list[int]:
        """Token ids that extend ``prefix`` (the ids after ``<|db_entity|>``) towards a key; [] if none."""
        self._sync()
        p = _as_str(prefix)
        if p not in self._allowed:
            if len(self._allowed) >= QUERY_CACHE_SIZE:
                self._allowed.clear()
            self._allowed[p] = self._children(p)
        return self._allowed[p]

    def _children(self, p: str) -> list[int]:
        keys, n, out = self._sorted, len(p), []
        i = bisect.bisect_left(keys, p)
        while i < len(keys) and keys[i].startswith(p):
            if len(keys[i]) == n:
                i += 1
                continue
            c = keys[i][n]
            out.append(ord(c))
            i = bisect.bisect_left(keys, p + chr(ord(c) + 1), i)
        return out

    def __len__(self) -> int:
        self._sync()
        return len(self._sorted)

    def lookup(self, entity: str, relation: str) -> LookupResult:
        return self.exact.lookup(entity, relation)

    def lookup_batch(self, keys: Sequence[tuple[str, str]]) -> list[LookupResult]:
        return self.exact.lookup_batch(keys)


def _as_str(ids: Iterable[int]) -> str:
    """Token ids as a string of code points, so that sorting and bisecting work on C strings."""
    return "".join(map(chr, ids))


def open_index(db: LookupDatabase, mode: str, *, embed: Embed | None = None, tokenizer=None, **options):
    """The index for a lookup mode: "exact", "fuzzy" (entity-first), "fuzzy-flat" (the reference's), or "trie"."""
    if mode == "exact":
        return ExactIndex(db)
    if mode in ("fuzzy", "fuzzy-flat"):
        if embed is None:
            raise UserInputError(f"lookup mode {mode!r} needs an embedding function (models.embed.embed)")
        return FuzzyIndex(db, embed, mode="flat" if mode == "fuzzy-flat" else "entity-first", **options)
    if mode == "trie":
        if tokenizer is None:
            raise UserInputError("lookup mode 'trie' needs the model's tokenizer")
        return KeyTrie(db, tokenizer)
    raise UserInputError(f"lookup mode {mode!r}: use exact, fuzzy, fuzzy-flat or trie")
