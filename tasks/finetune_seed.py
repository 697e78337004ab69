"""The seed as both kinds of small annotator are fine-tuned on it: annotated documents read from the seed shards,
the held-out split (a stable hash of the doc_id, so it does not depend on shard order), and the signature that
tells whether a checkpoint was trained on these inputs with this config."""

from __future__ import annotations

import hashlib

from schemas import markup
from schemas.configs import AnnotatorFinetuneConfig
from schemas.errors import UserInputError
from tasks.shardio import fs_and_path, read_table


def read_seed(annotated_shards: list[str]) -> list[tuple[str, markup.Annotated]]:
    """(doc_id, annotated) of every document in the annotated seed shards."""
    docs = []
    for shard in annotated_shards:
        for r in read_table(shard, ["doc_id", "annotated_text"]).to_pylist():
            docs.append((r["doc_id"], markup.parse(r["annotated_text"])))
    if not docs:
        raise UserInputError(f"fine-tuning: the seed shards {annotated_shards} hold no annotated documents; "
                             "run seed annotation first")
    return docs


def is_holdout(doc_id: str, fraction: float, seed: int) -> bool:
    """Whether a document is held out: a stable hash of (seed, doc_id), independent of order."""
    h = hashlib.sha1(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def seed_signature(annotated_shards: list[str], cfg: AnnotatorFinetuneConfig) -> str:
    """A digest of the fine-tune config (less the fields that do not change the model) and the seed shards' bytes:
    an existing checkpoint with the same signature is reused."""
    digest = hashlib.sha1(cfg.model_dump_json(exclude={"threads", "time_budget_s"}).encode())
    for shard in sorted(annotated_shards):
        fs, path = fs_and_path(shard)
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
