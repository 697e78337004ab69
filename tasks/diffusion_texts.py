"""The texts the latent-diffusion stages train and are scored on: document shards (the configured ones,
or a synthetic corpus generated and ingested once under the workdir) split into training and held-out
texts, with the frozen encoder's features of the training texts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from schemas.configs import IngestConfig
from schemas.diffusion_configs import LatentDiffusionFlowConfig
from schemas.guided_configs import GuidedFlowConfig
from schemas.errors import UserInputError
from tasks.diffusion import TextSplit, build_encoder, encoder_features, extract_texts
from tasks.ingest import ingest_corpus
from tasks.shardio import list_files
from tasks.synthetic import generate_corpus

logger = logging.getLogger(f"lmlm.{__name__}")


@dataclass
class TextData:
    train: TextSplit
    holdout: TextSplit
    stats: dict
    features: tuple | None = None  # cached encoder features of train.texts
    encoder: object | None = None


def document_shards(config: LatentDiffusionFlowConfig | GuidedFlowConfig) -> list[str]:
    """The configured document shards, or those of a synthetic corpus generated (once per corpus config)
    and ingested under ``<workdir>/corpus`` (any flow config with ``document_shards``, ``workdir``, ``synthetic``)."""
    if config.document_shards:
        shards = sorted({p for loc in config.document_shards for p in list_files(loc, (".parquet",))})
        if not shards:
            raise UserInputError(f"no .parquet document shards under {config.document_shards}; pass shard files or folders")
        return shards
    out = Path(config.workdir, "corpus")
    shard_dir = out / "shards" / "documents"
    marker = out / "synthetic-config.json"  # the corpus config the shards were made from
    wanted = config.synthetic.model_dump_json()
    if not (marker.exists() and marker.read_text() == wanted and list_files(str(shard_dir), (".parquet",))):
        generate_corpus(config.synthetic, str(out / "synthetic"))
        ingest_corpus(IngestConfig(inputs=[str(out / "synthetic" / "corpus")], output=str(out / "shards"), workers=1),
                      run_id="latent-diffusion")
        marker.write_text(wanted)
    return list_files(str(shard_dir), (".parquet",))


def split_texts(config: LatentDiffusionFlowConfig, encoder) -> tuple[TextSplit, TextSplit, dict]:
    """(training, held-out, counts): the texts of the configured shards as the flow splits them."""
    return extract_texts(
        document_shards(config), count_tokens=encoder.token_count, max_tokens=config.max_tokens,
        pack=config.pack_sentences, label_column=config.label_column, holdout_fraction=config.holdout_fraction,
        max_texts=config.max_texts, seed=config.autoencoder.seed)


def prepare_texts(config: LatentDiffusionFlowConfig, device: torch.device, need_features: bool = True) -> TextData:
    """Texts of the shards split into training / held-out, and the frozen encoder's features of the training texts."""
    encoder = build_encoder(config.autoencoder).to(device)
    train, holdout, stats = split_texts(config, encoder)
    logger.info("texts: %d training, %d held out from %d documents", stats["train_texts"], stats["holdout_texts"],
                stats["documents"])
    features = encoder_features(encoder, train.texts, config.max_tokens, log=logger.info) if need_features else None
    return TextData(train, holdout, stats, features, encoder)
