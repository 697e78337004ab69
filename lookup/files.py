"""The lookup database's files: the reference JSON (read and written) and the Parquet export (written).

Reference JSON format (kilian-group/LMLM): ``{"entities": [...], "relationships": [...],
"return_values": [...], "triplets": [[entity, relation, value], ...]}``. The Parquet form has one
row per fact with its provenance: entity, relation, value, n_sources, sources (doc ids),
source_urls, provenance ('observed' or 'edit'). :func:`lookup.database.read_facts` reads both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import fsspec
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.errors import UserInputError
from schemas.markup import LookupCall, MarkupError
from schemas.shards import SHARD_COMPRESSION


def read_reference_db(json_path: str) -> tuple[list[list[str]], bytes]:
    """The triplets of a reference JSON database (checked against the lookup grammar) and its bytes."""
    try:
        with fsspec.open(os.fspath(json_path), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserInputError(f"reference database {json_path} not found; check the path") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise UserInputError(f"reference database {json_path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("triplets"), list):
        raise UserInputError(
            f"reference database {json_path}: expected an object with a 'triplets' list"
            ' ({"entities", "relationships", "return_values", "triplets"})'
        )
    for i, t in enumerate(data["triplets"]):
        if not (isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) for x in t)):
            raise UserInputError(
                f"reference database {json_path}: triplets[{i}] must be [entity, relation, value] strings,"
                f" got {str(t)[:80]}"
            )
        try:
            LookupCall(*t)
        except MarkupError as e:
            raise UserInputError(f"reference database {json_path}: triplets[{i}]: {e}") from None
    return data["triplets"], raw


def write_reference_db(path: str, triplets: Sequence[tuple[str, str, str]]) -> None:
    """Write (entity, relation, value) triplets, in the order given, as a reference JSON database;
    its name lists are sorted and distinct."""
    entities, relations, values = (sorted({t[k] for t in triplets}) for k in range(3))
    document = {
        "entities": entities,
        "relationships": relations,
        "return_values": values,
        "triplets": [list(t) for t in triplets],
    }
    _write_file(os.fspath(path), lambda f: f.write(orjson.dumps(document)))


def write_lookup_parquet(path: str, facts: pa.Table) -> None:
    """Write a table of facts (the columns of the module docstring) as the lookup database's Parquet file."""
    _write_file(os.fspath(path), lambda f: pq.write_table(facts, f, compression=SHARD_COMPRESSION))


def _write_file(path: str, write) -> None:
    """Call ``write(binary file)`` for ``path``; local files appear whole or not at all."""
    if "://" in path and not path.startswith("file://"):
        with fsspec.open(path, "wb") as f:
            write(f)
        return
    path = path.removeprefix("file://")
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
