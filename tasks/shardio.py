"""Shard I/O on local paths and fsspec URLs (``s3://``, ``gs://``, ``hf://``, ``memory://``, ``file://``).

Shards are zstd Parquet. A shard appears under its final name only once it is complete: it is written
under a temporary name (``*.tmp``, which ``*.parquet`` globs and :func:`list_files` never match) and
then moved into place.
"""

from __future__ import annotations

import posixpath
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from schemas.shards import SHARD_COMPRESSION

_GLOB_CHARS = "*?["


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``url`` and the path on it (a local path stays a local path)."""
    return fsspec.core.url_to_fs(url)


def as_url(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """``path`` on ``fs`` spelled the way ``like`` was: a plain path stays plain, a URL keeps its protocol."""
    if isinstance(fs, LocalFileSystem) and "://" not in like:
        return path
    return fs.unstrip_protocol(path)


def list_files(url: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files under a folder (recursive), matching a glob, or the file itself, whose names end with one of
    ``suffixes``; sorted, spelled like ``url``. A location that does not exist gives ``[]``."""
    fs, path = fs_and_path(url)
    if any(c in path for c in _GLOB_CHARS):
        paths = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isdir(path):
        paths = fs.find(path)
    elif fs.isfile(path):
        paths = [path]
    else:
        paths = []
    return sorted(as_url(fs, p, url) for p in paths if p.endswith(suffixes))


def read_table(url: str, columns: list[str] | None = None) -> pa.Table:
    """A whole Parquet shard (or only ``columns``)."""
    fs, path = fs_and_path(url)
    if isinstance(fs, LocalFileSystem):
        return pq.read_table(path, columns=columns)
    return pq.read_table(path, columns=columns, filesystem=fs)


def write_table_atomic(table: pa.Table, url: str) -> str:
    """Write ``table`` as a zstd Parquet shard at ``url``; readers never see a partial file. Returns ``url``."""
    fs, path = fs_and_path(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = temporary_path(path)
    try:
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f, compression=SHARD_COMPRESSION)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    return url


def temporary_path(path: str) -> str:
    """A unique sibling name for writing ``path`` before it is moved into place."""
    return f"{path}.{uuid.uuid4().hex[:12]}.tmp"
