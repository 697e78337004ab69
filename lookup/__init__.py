"""The lookup database a model consults, and its indexes behind one protocol.

- :mod:`lookup.keys`: the normalised form of a name (:func:`normalize_key`) and name variants.
- :mod:`lookup.files`: the reference JSON (read and written) and the Parquet export (written).
- :mod:`lookup.database`: :class:`LookupDatabase`, one :class:`StoredFact` per key plus the alias
  tables, read from those files, from a warehouse file (read-only) or a DuckDB connection.
- :mod:`lookup.index`: the :class:`LookupIndex` protocol, :class:`LookupResult`, :class:`ExactIndex`
  and the key prefix tree :class:`KeyTrie` for constrained decoding.
- :mod:`lookup.fuzzy`: :class:`FuzzyIndex` (embeddings; the reference's flat mode and entity-first)
  over :class:`VectorIndex` (faiss).
- :mod:`lookup.modes`: :func:`open_index` (a mode name to an index) and :func:`open_lookup` (a file
  or warehouse and a mode to an index).

This package imports nothing of the project but ``schemas``: the warehouse writes the files and
tables it reads, and models and tasks consult its indexes.
"""

from lookup.database import EDIT_SOURCE, LookupDatabase, StoredFact, read_aliases, read_facts
from lookup.files import read_reference_db, write_lookup_parquet, write_reference_db
from lookup.fuzzy import FuzzyIndex, VectorIndex
from lookup.index import UNKNOWN, ExactIndex, KeyTrie, LookupIndex, LookupResult
from lookup.keys import is_name_variant, name_words, normalize_key
from lookup.modes import open_index, open_lookup

__all__ = [
    "EDIT_SOURCE", "UNKNOWN", "ExactIndex", "FuzzyIndex", "KeyTrie", "LookupDatabase", "LookupIndex", "LookupResult",
    "StoredFact", "VectorIndex", "is_name_variant", "name_words", "normalize_key", "open_index", "open_lookup",
    "read_aliases", "read_facts", "read_reference_db", "write_lookup_parquet", "write_reference_db",
]
