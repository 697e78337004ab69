"""Ingest planning: which corpus files the inputs name, which of them the manifest already holds, and how
they are grouped into tasks for the workers."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

import orjson

from schemas.errors import UserInputError
from tasks.shardio import as_url, fs_and_path

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz", ".jsonl.zst", ".json.zst",
                  ".jsonl.zstd", ".json.zstd")
PARQUET_SUFFIXES = (".parquet",)
TXT_SUFFIXES = (".txt",)
CORPUS_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TXT_SUFFIXES

MIN_TASK_BYTES = 16 << 20  # small files are grouped into tasks of at least this many (compressed) bytes
MAX_TASK_BYTES = 512 << 20


class InputError(UserInputError):
    """An input location that does not exist, matches no corpus file, or is not a corpus file."""



# ---------------------------------------------------------------- inputs, manifest, plan


@dataclass(frozen=True)
class SourceFile:
    url: str  # spelled like the input that named it
    size: int
    fingerprint: str  # cheap change detector from the filesystem's listing (size, mtime, etag, ...)
    checksum: str | None = None  # "sha256:<hex>" when computed before ingestion


def kind_of(url: str) -> str | None:
    """'jsonl', 'parquet' or 'txt' from the file name; None when it is not a corpus file."""
    name = url.lower()
    for kind, suffixes in (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("txt", TXT_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def _fingerprint(info: dict) -> str:
    keys = ("size", "mtime", "created", "ETag", "etag", "md5Hash", "crc32c", "generation", "blob_id", "LastModified")
    picked = {k: info[k] for k in keys if info.get(k) is not None}
    return hashlib.sha1(orjson.dumps(picked, default=str, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def expand_inputs(inputs: list[str], exclude: str | None = None) -> list[SourceFile]:
    """Every corpus file named by ``inputs`` (files, folders, globs), once each, in input order then name
    order; files under ``exclude`` (the output folder) are left out. Raises :class:`InputError` for an
    input that does not exist, matches no corpus file, or is a file of an unsupported type."""
    if not inputs:
        raise InputError("no inputs given: pass corpus files, folders or glob patterns")
    excluded = fs_and_path(exclude)[1].rstrip("/") + "/" if exclude else None
    files: dict[str, SourceFile] = {}
    for loc in inputs:
        fs, path = fs_and_path(loc)
        if any(c in path for c in "*?["):
            found = fs.glob(path, detail=True)
            infos = {}
            for p, info in found.items():
                infos.update(fs.find(p, detail=True) if info["type"] == "directory" else {p: info})
        elif fs.isdir(path):
            infos = fs.find(path, detail=True)
        elif fs.exists(path):
            if kind_of(path) is None:
                raise InputError(f"input {loc!r} is not a corpus file: name it *.jsonl[.gz|.zst], "
                                 f"*.json.gz, *.parquet or *.txt, or pass its folder")
            infos = {path: fs.info(path)}
        else:
            raise InputError(f"input {loc!r} does not exist: pass an existing file, folder or glob pattern")
        matched = [
            (p, info) for p, info in sorted(infos.items())
            if info.get("type", "file") == "file" and kind_of(p) is not None
            and not posixpath.basename(p).startswith((".", "_"))
            and not (excluded and (p.rstrip("/") + "/").startswith(excluded))
        ]
        if not matched:
            raise InputError(f"input {loc!r} matches no corpus file ({', '.join(CORPUS_SUFFIXES)}): "
                             f"check the path or pattern")
        for p, info in matched:
            url = as_url(fs, p, loc)
            files.setdefault(url, SourceFile(url, int(info.get("size") or 0), _fingerprint(info)))
    return list(files.values())


def read_manifest(output: str) -> list[dict]:
    """Every manifest line under ``output``: one per source file per ingest task."""
    fs, root = fs_and_path(output)
    folder = posixpath.join(root, "_manifest")
    if not fs.isdir(folder):
        return []
    entries = []
    for p in sorted(fs.find(folder)):
        if p.endswith(".jsonl"):
            entries.extend(orjson.loads(line) for line in fs.cat_file(p).splitlines() if line.strip())
    return entries


def remove_orphans(output: str, manifest: list[dict]) -> list[str]:
    """Delete our shards and temporary files that no manifest line refers to (left by a crash or an
    interrupted run); returns their paths. Other files in the output folder are left alone."""
    fs, root = fs_and_path(output)
    referenced = {posixpath.join(root, s) for e in manifest for s in e["document_shards"] + e["quarantine_shards"]}
    removed = []
    for sub in ("documents", "quarantine", "_manifest"):
        folder = posixpath.join(root, sub)
        if not fs.isdir(folder):
            continue
        for p in fs.find(folder):
            name = posixpath.basename(p)
            ours = name.startswith("part-") and (name.endswith(".tmp") or sub != "_manifest")
            if ours and p not in referenced:
                fs.rm(p)
                removed.append(p)
    return removed


def sha256_of(url: str) -> str:
    fs, path = fs_and_path(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def files_to_ingest(files: list[SourceFile], manifest: list[dict]) -> tuple[list[SourceFile], list[SourceFile]]:
    """(to ingest, skipped). Skipped: the manifest holds the same url and fingerprint, or the same
    checksum (computed here only for files whose size equals that of an ingested file)."""
    done = [e for e in manifest if e["status"] == "ingested"]
    by_url = {(e["url"], e["fingerprint"]) for e in done}
    checksums = {e["checksum"] for e in done if e.get("checksum")}
    sizes = {e["size"] for e in done}
    todo, skipped = [], []
    for f in files:
        if (f.url, f.fingerprint) in by_url:
            skipped.append(f)
        elif f.size in sizes:
            f = SourceFile(f.url, f.size, f.fingerprint, sha256_of(f.url))
            (skipped if f.checksum in checksums else todo).append(f)
        else:
            todo.append(f)
    return todo, skipped


def plan_tasks(files: list[SourceFile], workers: int) -> list[list[SourceFile]]:
    """Files grouped into tasks (one worker, one set of shards each): whole files, small ones grouped so
    each task has at least clamp(total / (4 * workers), MIN_TASK_BYTES, MAX_TASK_BYTES) bytes. One
    worker keeps input order (the first copy of a duplicate is kept); several take the largest first."""
    target = min(max(sum(f.size for f in files) // (4 * workers), MIN_TASK_BYTES), MAX_TASK_BYTES)
    tasks: list[list[SourceFile]] = []
    current: list[SourceFile] = []
    current_bytes = 0
    for f in files:
        current.append(f)
        current_bytes += f.size
        if current_bytes >= target:
            tasks.append(current)
            current, current_bytes = [], 0
    if current:
        tasks.append(current)
    return tasks if workers == 1 else sorted(tasks, key=lambda t: -sum(f.size for f in t))
