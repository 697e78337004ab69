"""Per-shard profiles of document shards: documents, words, characters and documents per category."""

from __future__ import annotations

import os
import socket

import pyarrow.compute as pc

from schemas.reports import CorpusProfile, ShardProfile
from tasks.shardio import read_table


def profile_document_shard(shard: str) -> ShardProfile:
    """Counts of one document shard, and which worker (host:pid) computed them."""
    table = read_table(shard, ["text", "category"])
    text = table["text"]
    words = pc.list_value_length(pc.utf8_split_whitespace(text))
    categories = table["category"].fill_null("(none)").value_counts().to_pylist()
    return ShardProfile(shard=shard, documents=table.num_rows, words=int(pc.sum(words).as_py() or 0),
                        characters=int(pc.sum(pc.utf8_length(text)).as_py() or 0),
                        categories={c["values"]: c["counts"] for c in categories},
                        worker=f"{socket.gethostname()}:{os.getpid()}")


def merge_profiles(profiles: list[ShardProfile], task_runner: str) -> CorpusProfile:
    """The corpus-wide totals of per-shard profiles computed on ``task_runner``."""
    categories: dict[str, int] = {}
    for p in profiles:
        for c, n in p.categories.items():
            categories[c] = categories.get(c, 0) + n
    return CorpusProfile(shards=len(profiles), documents=sum(p.documents for p in profiles),
                         words=sum(p.words for p in profiles), characters=sum(p.characters for p in profiles),
                         categories=dict(sorted(categories.items(), key=lambda kv: (-kv[1], kv[0]))),
                         workers=sorted({p.worker for p in profiles}), task_runner=task_runner, per_shard=profiles)
