"""The lookup index protocol, and the indexes that need no embeddings: exact keys and the key prefix tree.

Every index answers ``lookup(entity, relation)`` with a :class:`LookupResult` whose value is
``"unknown"`` on a miss, and tells constrained decoding which tokens may come next inside a call
(``allowed_next``; None from an index that does not constrain decoding).

- :class:`ExactIndex`: the normalised key (casefold, collapsed whitespace, no punctuation at the
  ends), with names mapped through the alias tables.
- :class:`KeyTrie`: the tokenized keys, for decoding that can only produce keys in the database.
- :class:`lookup.fuzzy.FuzzyIndex`: embedding lookups (the reference's flat cosine, or entity-first).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lookup.database import LookupDatabase, StoredFact
from lookup.keys import normalize_key
from schemas.markup import DB_RELATIONSHIP, DB_RETURN

UNKNOWN = "unknown"  # the value a miss returns, as in the reference
QUERY_CACHE_SIZE = 100_000  # query strings (or token prefixes) whose answers are kept


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
    def of(cls, fact: StoredFact, score: float = 1.0) -> LookupResult:
        return cls(fact.value, fact.entity, fact.relation, score, list(fact.sources), True)

    @classmethod
    def miss(cls, entity: str | None = None, relation: str | None = None, score: float = 0.0) -> LookupResult:
        return cls(UNKNOWN, entity, relation, score, [], False)


class LookupIndex(Protocol):
    """What generation and evaluation need of an index over a :class:`LookupDatabase`."""

    def lookup(self, entity: str, relation: str) -> LookupResult:
        """The value of one key, or a miss."""
        ...

    def lookup_batch(self, keys: Sequence[tuple[str, str]]) -> list[LookupResult]:
        """One result per (entity, relation) key, in order; equal to ``lookup`` on each."""
        ...

    def allowed_next(self, prefix: Sequence[int]) -> list[int] | None:
        """Token ids that may follow ``prefix`` (the ids after ``<|db_entity|>``) inside a call:
        [] when no key continues it; None when this index does not constrain decoding."""
        ...


def _resolve_exact_entity(db: LookupDatabase, entity: str) -> tuple[str, ...]:
    """Normalised database entities that ``entity`` names exactly or through the alias table."""
    e = normalize_key(entity)
    if e in db.relations_of:
        return (e,)
    return tuple(x for x in db.entity_aliases.get(e, ()) if x in db.relations_of)


def _resolve_exact_relation(db: LookupDatabase, entity: str, relation: str) -> StoredFact | None:
    rels = db.relations_of[entity]
    r = normalize_key(relation)
    return rels.get(r) or rels.get(db.relation_aliases.get(r, ""))


def _entity_name(db: LookupDatabase, entity: str) -> str:
    return next(iter(db.relations_of[entity].values())).entity


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

    def allowed_next(self, prefix: Sequence[int]) -> None:
        return None  # any key may be written; a miss answers unknown


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
