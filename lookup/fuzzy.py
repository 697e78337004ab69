"""Embedding lookups over the lookup database, and the vector index (faiss) beneath them.

- :class:`FuzzyIndex`, ``mode="flat"``: the reference's lookup, cosine >= 0.6 between the
  all-MiniLM-L6-v2 embeddings of ``"entity relation"`` strings, top-1.
- :class:`FuzzyIndex`, ``mode="entity-first"``: resolve the entity (exact, alias, then a name
  variant: same first and last word, a middle part dropped or added; or a near-identical
  embedding), then the relation among that entity's own relations (exact, alias, the relation
  vocabulary, then embeddings with a margin over the relations the entity lacks). A key absent
  from the database answers ``unknown`` instead of its nearest neighbour's value.

After :meth:`lookup.database.LookupDatabase.refresh` an index follows at its next lookup,
embedding only names it has not seen.

The embedding function is injected (``embed(texts) -> L2-normalised float32 array``), e.g.
``models.embed.embed``; this module never loads a model itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from lookup.database import LookupDatabase
from lookup.index import QUERY_CACHE_SIZE, LookupResult, _entity_name, _resolve_exact_entity
from lookup.keys import is_name_variant, name_words, normalize_key
from schemas.errors import UserInputError

Embed = Callable[[list[str]], np.ndarray]
# Relation names are embedded as they are and as a question, averaged: a question gives the
# encoder the sense of a short relation name ("Born On" -> "What is the Born On?").
RELATION_TEMPLATES = ("{}", "What is the {}?")

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

    def allowed_next(self, prefix: Sequence[int]) -> None:
        return None  # any key may be written; the nearest one answers

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
