"""The seed as both kinds of small annotator are fine-tuned on it: annotated documents read from the seed shards,
the held-out split (a stable hash of the doc_id, so it does not depend on shard order), and the signature that
tells whether a checkpoint was trained on these inputs with this config."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

from schemas import markup
from schemas.configs import AnnotatorFinetuneConfig
from schemas.errors import UserInputError
from schemas.reports import FinetuneReport
from tasks.shardio import fs_and_path, read_table


def read_seed(annotated_shards: list[str]) -> list[tuple[str, markup.Annotated]]:
    """(doc_id, annotated) of every document in the annotated seed shards."""
    docs = []
    for shard in annotated_shards:
        try:
            rows = read_table(shard, ["doc_id", "annotated_text"]).to_pylist()
        except (KeyError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError: a column is missing
            reason = str(exc).splitlines()[0]
            raise UserInputError(f"fine-tuning: {shard} is not an annotated shard ({reason}); pass the seed's "
                                 "annotated shards (<workdir>/seed/annotated)") from None
        for r in rows:
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


def split_seed(docs: list[tuple[str, markup.Annotated]], cfg: AnnotatorFinetuneConfig):
    """(train, holdout) seed documents by doc_id hash; an error line when nothing is left to train on."""
    holdout = [d for d in docs if is_holdout(d[0], cfg.holdout_fraction, cfg.seed)]
    train = [d for d in docs if not is_holdout(d[0], cfg.holdout_fraction, cfg.seed)]
    if not train:
        raise UserInputError(f"fine-tuning: all {len(docs)} seed documents are held out; lower "
                             "finetune.holdout_fraction or annotate a larger seed sample")
    return train, holdout


def checkpoint_meta(checkpoint: str) -> dict | None:
    """The annotator.json a checkpoint of either kind stores (None: none, or unreadable)."""
    path = os.path.join(checkpoint, "annotator.json")
    if not os.path.isfile(path):
        return None
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def up_to_date_report(checkpoint: str, signature: str, version: str,
                      log: Callable[[str], None]) -> FinetuneReport | None:
    """The stored report of a checkpoint fine-tuned on the same seed with the same settings (None: retrain)."""
    meta = checkpoint_meta(checkpoint)
    if meta is None or meta.get("signature") != signature:
        return None
    log(f"fine-tune: {checkpoint} is up to date (version {version}); not retrained")
    return FinetuneReport(**{**meta["report"], "reused": True})  # the stored report says reused: false
