"""Exact deduplication for ingest: hashing and escaping over Arrow buffers, and the id/text key sets
every worker checks against (see the memory promise in tasks/ingest.py)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.markup import escape, needs_escape
from tasks.shardio import fs_and_path

KEEP, DUPLICATE, DUPLICATE_ID, TEXTLESS = 0, 1, 2, 3  # per-document outcome codes



# ---------------------------------------------------------------- dedup


class KeySet:
    """A set of non-zero 64-bit keys in one numpy open-addressing table (linear probing, load 1/3..2/3,
    so 12-24 bytes per key). Keys are hash prefixes, hence already uniform: the slot is the low bits."""

    def __init__(self, capacity: int = 1 << 16):
        self._table = np.zeros(capacity, np.uint64)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def contains(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), bool)
        mask = np.uint64(len(self._table) - 1)
        slots = keys & mask
        todo = np.arange(len(keys))
        while todo.size:
            seen = self._table[slots[todo]]
            hit = seen == keys[todo]
            found[todo[hit]] = True
            todo = todo[(seen != 0) & ~hit]
            slots[todo] = (slots[todo] + np.uint64(1)) & mask
        return found

    def add(self, keys: np.ndarray) -> None:
        """Insert keys that are neither in the set nor repeated among themselves."""
        if 3 * (self._size + len(keys)) > 2 * len(self._table):
            capacity = len(self._table)
            while 3 * (self._size + len(keys)) > capacity:
                capacity *= 2
            old = self._table[self._table != 0]
            self._table = np.zeros(capacity, np.uint64)
            self._place(old)
        self._place(keys)
        self._size += len(keys)

    def _place(self, keys: np.ndarray) -> None:
        table, mask = self._table, np.uint64(len(self._table) - 1)
        slots = keys & mask
        todo = np.arange(len(keys))
        while todo.size:
            free = table[slots[todo]] == 0
            cand = todo[free]
            table[slots[cand]] = keys[cand]  # keys racing for one slot: one wins, the others probe on
            won = table[slots[cand]] == keys[cand]
            todo = np.concatenate([todo[~free], cand[~won]])
            slots[todo] = (slots[todo] + np.uint64(1)) & mask


class Deduplicator:
    """Exact dedup across files and runs on 64-bit prefixes of the text and id hashes (a false duplicate
    needs a 64-bit collision: ~2.7e-4 chance per 100M documents)."""

    def __init__(self) -> None:
        self.texts = KeySet()
        self.ids = KeySet()

    def check(self, text_keys: np.ndarray, id_keys: np.ndarray) -> np.ndarray:
        """Per document, in order: KEEP, DUPLICATE (text seen before) or DUPLICATE_ID (new text under an id
        seen before); kept documents are remembered."""
        text_keys, id_keys = np.maximum(text_keys, 1), np.maximum(id_keys, 1)  # 0 marks a free slot
        text_seen, id_seen = self.texts.contains(text_keys), self.ids.contains(id_keys)
        codes = np.empty(len(text_keys), np.uint8)
        block_texts: set[int] = set()
        block_ids: set[int] = set()
        for i, (t, d, ts, ds) in enumerate(zip(text_keys.tolist(), id_keys.tolist(), text_seen.tolist(),
                                               id_seen.tolist())):
            if ts or t in block_texts:
                codes[i] = DUPLICATE
            elif ds or d in block_ids:
                codes[i] = DUPLICATE_ID
            else:
                codes[i] = KEEP
                block_texts.add(t)
                block_ids.add(d)
        keep = codes == KEEP
        self.texts.add(text_keys[keep])
        self.ids.add(id_keys[keep])
        return codes

    def remember_shard(self, url: str) -> None:
        """Remember the documents of an existing document shard (dedup across runs)."""
        fs, path = fs_and_path(url)
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=["doc_id", "content_hash"]):
                hashes = "".join(batch.column("content_hash").to_pylist())
                digests = np.frombuffer(bytes.fromhex(hashes), np.uint8).reshape(-1, 20)
                self.check(key64(digests), key64(sha1_digests(batch.column("doc_id"))))


# ---------------------------------------------------------------- hashing and escaping over Arrow buffers


def _offsets_data(arr: pa.StringArray) -> tuple[np.ndarray, memoryview]:
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset:arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    return offsets, memoryview(data) if data is not None else memoryview(b"")


def sha1_digests(arr: pa.StringArray) -> np.ndarray:
    """sha1 of each string's UTF-8 bytes, read straight from the Arrow buffers: shape (n, 20) uint8."""
    offsets, data = _offsets_data(arr)
    o = offsets.tolist()
    sha1 = hashlib.sha1
    joined = b"".join([sha1(data[a:b]).digest() for a, b in zip(o, o[1:])])
    return np.frombuffer(joined, np.uint8).reshape(-1, 20)


def key64(digests: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(digests[:, :8]).view("<u8").ravel()


_HEX = np.frombuffer(b"".join(b"%02x" % i for i in range(256)), np.uint8).reshape(256, 2)


def hex_digests(digests: np.ndarray) -> pa.StringArray:
    n, width = digests.shape
    chars = np.ascontiguousarray(_HEX[digests]).reshape(-1)
    offsets = np.arange(0, (n + 1) * 2 * width, 2 * width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars))


def _marker_rows(text: pa.StringArray) -> np.ndarray:
    """Rows whose text holds '|db_' or 'dblookup(': a superset of the rows escape() changes, found with
    two vectorised byte scans so that the common case costs no per-document Python."""
    offsets, data = _offsets_data(text)
    a = np.frombuffer(data, np.uint8)[:offsets[-1]] if len(text) else np.zeros(0, np.uint8)
    pipe = np.flatnonzero(a[:-3] == ord("|"))
    pipe = pipe[(a[pipe + 1] == ord("d")) & (a[pipe + 2] == ord("b")) & (a[pipe + 3] == ord("_"))]
    paren = np.flatnonzero(a[8:] == ord("(")) + 8
    for j, ch in enumerate(b"dblookup"):
        paren = paren[a[paren - 8 + j] == ch]
    pos = np.concatenate([pipe, paren])
    rows = np.searchsorted(offsets, pos, side="right") - 1
    return np.unique(rows[(rows >= 0) & (rows < len(text))])


def escape_texts(text: pa.StringArray) -> pa.StringArray:
    """:func:`schemas.markup.escape` applied to every text that needs it."""
    rows = _marker_rows(text)
    if not rows.size:
        return text
    originals = [text[int(i)].as_py() for i in rows]
    changed = [(int(i), escape(t)) for i, t in zip(rows, originals) if needs_escape(t)]
    if not changed:
        return text
    mask = np.zeros(len(text), bool)
    mask[[i for i, _ in changed]] = True
    return pc.replace_with_mask(text, pa.array(mask), pa.array([t for _, t in changed], pa.string()))
