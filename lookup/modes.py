"""Lookup modes: the index a mode name builds, and a lookup opened from a file or a warehouse."""

from __future__ import annotations

import os

from lookup.database import WAREHOUSE_SUFFIX, LookupDatabase
from lookup.fuzzy import Embed, FuzzyIndex
from lookup.index import ExactIndex, KeyTrie, LookupIndex
from schemas.errors import UserInputError


def open_index(db: LookupDatabase, mode: str, *, embed: Embed | None = None, tokenizer=None, **options) -> LookupIndex:
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


def open_lookup(source: str | os.PathLike, mode: str, tokenizer=None, *, embed: Embed | None = None) -> LookupIndex:
    """The lookup index over a lookup database file (.parquet/.json) or a warehouse (.duckdb, read-only).

    ``embed`` (e.g. ``models.embed.embed``) is needed by the fuzzy modes, ``tokenizer`` by "trie".
    """
    source = os.fspath(source)
    if source.endswith(WAREHOUSE_SUFFIX) and not os.path.isfile(source):
        raise UserInputError(f"warehouse {source} not found; run `lmlm run` or pass --lookup-db")
    return open_index(LookupDatabase.load(source), mode, embed=embed, tokenizer=tokenizer)
