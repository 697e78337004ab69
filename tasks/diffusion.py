"""Latent diffusion for language (LD4LG), as plain functions over document shards.

    document shards -> texts (sentences packed per paragraph, up to max_tokens) split by doc_id hash
    -> frozen encoder features (computed once) -> autoencoder training -> reconstruction BLEU / exact match
    -> latents -> diffusion training (EMA) -> samples (DDPM / DDIM, classifier-free guidance)

Output folders (each written atomically; a folder whose trainer state says it is complete is reused,
an incomplete one resumes from its last checkpoint)::

    <out>/autoencoder/   model.safetensors, config.json, tokenizer/ (minilm decoder), trainer_state.pt
    <out>/diffusion/     model.safetensors, ema.safetensors, config.json (classes), trainer_state.pt

Training is deterministic by seed: the batch and the noise of step s come from generators seeded with
(seed, s), so a resumed run draws the same batches as an uninterrupted one. Evaluation (reconstruction
BLEU, MAUVE, diversity, memorisation, perplexity, class accuracy, the baselines) is in ``tasks.evaluate_diffusion``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from models.autoencoder import (
    CompactVocabulary,
    HubSeq2Seq,
    LatentAutoencoder,
    MiniLMEncoder,
    parallel_targets,
    shifted_targets,
)
from models.diffusion import EMA, Denoiser, LatentDiffusion
from models.device import device_of, resolve_device
from models.train import (
    fit,
    load_module,
    load_trainer_state,
    save_module,
    save_trainer_state,
    write_folder_atomic,
)
from schemas.diffusion_configs import AutoencoderConfig, DiffusionConfig, SamplingConfig
from schemas.errors import UserInputError
from tasks.shardio import read_table

SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


# ----------------------------------------------------------------------------- texts from shards


@dataclass
class TextSplit:
    texts: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)


def paragraph_sentences(text: str) -> list[list[str]]:
    """The sentences of each paragraph (blank-line separated) of a document."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return [[s.strip() for s in SENTENCE_BOUNDARY.split(" ".join(p.split())) if s.strip()] for p in paragraphs]


def pack_units(sentences: list[str], counts: list[int], max_tokens: int, pack: bool) -> tuple[list[str], int]:
    """Consecutive sentences joined while their token count (``counts``, without special tokens) plus two
    special tokens stays within ``max_tokens``; one sentence per unit when ``pack`` is false. Returns
    (units, sentences dropped for being too long alone)."""
    units, current, n, dropped = [], [], 0, 0
    for sentence, k in zip(sentences, counts):
        if k + 2 > max_tokens:
            dropped += 1
            if current:
                units.append(" ".join(current))
            current, n = [], 0
            continue
        if current and (not pack or n + k + 2 > max_tokens):
            units.append(" ".join(current))
            current, n = [], 0
        current.append(sentence)
        n += k
    if current:
        units.append(" ".join(current))
    return units, dropped


def extract_texts(shards: list[str], *, count_tokens: Callable[[list[str]], list[int]], max_tokens: int,
                  pack: bool = True, label_column: str | None = "category", holdout_fraction: float = 0.1,
                  max_texts: int | None = None, seed: int = 0) -> tuple[TextSplit, TextSplit, dict]:
    """(training, held-out, counts): the texts of document shards with their labels, held-out documents
    chosen by doc_id hash. ``count_tokens`` counts encoder tokens without special tokens."""
    from tasks.pretrain import is_holdout  # the LMLM's split, so both model families hold out the same documents

    if not shards:
        raise UserInputError("no document shards given; pass shard files or folders, or leave them unset for a synthetic corpus")
    train, holdout = TextSplit(), TextSplit()
    stats = {"documents": 0, "sentences": 0, "dropped_long_sentences": 0}
    for shard in shards:
        columns = ["doc_id", "text"] + ([label_column] if label_column else [])
        try:
            rows = read_table(shard, columns).to_pylist()
        except (OSError, ValueError, KeyError) as exc:
            raise UserInputError(f"document shard {shard}: cannot read columns {columns} ({str(exc).splitlines()[0]}); "
                                 "pass document shards, or set label_column to an existing column or none") from exc
        for r in rows:
            paragraphs = paragraph_sentences(r["text"] or "")
            flat = [s for p in paragraphs for s in p]
            counts = iter(count_tokens(flat)) if flat else iter(())
            split = holdout if is_holdout(r["doc_id"], holdout_fraction) else train
            label = r.get(label_column) if label_column else None
            stats["documents"] += 1
            stats["sentences"] += len(flat)
            for p in paragraphs:
                units, dropped = pack_units(p, [next(counts) for _ in p], max_tokens, pack)
                stats["dropped_long_sentences"] += dropped
                split.texts += units
                split.labels += [label] * len(units)
    if not train.texts or not holdout.texts:
        raise UserInputError(
            f"{len(train.texts)} training and {len(holdout.texts)} held-out texts from {len(shards)} shard(s) "
            f"(max_tokens {max_tokens}); give more documents, a larger max_tokens, or another holdout_fraction")
    if max_texts is not None and len(train.texts) > max_texts:
        keep = np.sort(np.random.default_rng(seed).permutation(len(train.texts))[:max_texts])
        train = TextSplit([train.texts[i] for i in keep], [train.labels[i] for i in keep])
    stats.update(train_texts=len(train.texts), holdout_texts=len(holdout.texts))
    return train, holdout, stats


def class_ids(labels: list[str | None], classes: list[str]) -> torch.Tensor:
    """Class index per label; ``len(classes)`` (the "no class" id) for a missing or unknown label."""
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index.get(label, len(classes)) for label in labels], dtype=torch.long)


# ----------------------------------------------------------------------------- training data order


def step_generators(seed: int, step: int, device: torch.device | str = "cpu") -> tuple[np.random.Generator, torch.Generator]:
    """The batch and noise generators of one training step (so resuming redraws them exactly); the noise
    generator lives on ``device`` (the same seed draws other numbers on a GPU than on the CPU)."""
    return np.random.default_rng([seed, step]), torch.Generator(device).manual_seed(seed * 1_000_003 + step)


# ----------------------------------------------------------------------------- autoencoder


def build_encoder(cfg: AutoencoderConfig):
    """The frozen encoder of ``cfg.backbone``: MiniLMEncoder, or a HubSeq2Seq (needs the hub)."""
    if cfg.hub_name is None:
        return MiniLMEncoder()
    try:
        return HubSeq2Seq(cfg.hub_name)
    except OSError as exc:
        raise UserInputError(
            f"autoencoder backbone {cfg.backbone!r} ({cfg.hub_name}): cannot load it ({str(exc).splitlines()[0]}); "
            "it needs the Hugging Face hub or a local copy (set backbone to its folder), or use backbone minilm"
        ) from exc


def encoder_features(encoder, texts: list[str], max_tokens: int, batch_size: int = 256,
                     log: Callable[[str], None] = print):
    """(features (N, max_tokens, D) bfloat16, mask (N, max_tokens) bool) of the frozen encoder, computed once."""
    feats = torch.zeros(len(texts), max_tokens, encoder.dim, dtype=torch.bfloat16)
    mask = torch.zeros(len(texts), max_tokens, dtype=torch.bool)
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        f, m = encoder.features(texts[i:i + batch_size], max_tokens)
        feats[i:i + len(f), :f.shape[1]] = f.to(torch.bfloat16).cpu()
        mask[i:i + len(f), :m.shape[1]] = m.cpu()
    log(f"encoder features of {len(texts)} texts in {time.perf_counter() - t0:.0f} s")
    return feats, mask


@dataclass
class Autoencoder:
    """A trained autoencoder ready to encode texts and decode latents."""

    model: LatentAutoencoder
    config: AutoencoderConfig
    tokenizer: object  # decodes the decoder's ids (the trained BPE, or the hub tokenizer)
    max_tokens: int  # encoder input limit
    max_length: int  # decoder length limit (tokens, end-of-text included)
    hub: HubSeq2Seq | None = None
    encoder: object | None = None  # loaded on first use

    @property
    def eos(self) -> int:
        return self.tokenizer.eos_token_id

    def normalize(self, texts: list[str]) -> list[str]:
        """``texts`` as a perfect reconstruction spells them (lower case for the uncased minilm vocabulary)."""
        return texts if self.hub is not None else self.tokenizer.normalize(texts)

    def target_ids(self, texts: list[str]) -> list[list[int]]:
        if self.hub is not None:
            return self.hub.target_ids(texts, self.max_length)
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def encode(self, features, mask, batch_size: int = 512) -> torch.Tensor:
        """Latents (N, L, k) of cached encoder features."""
        self.model.eval()
        device = device_of(self.model)
        out = [self.model.encode(features[i:i + batch_size].to(device).float(), mask[i:i + batch_size].to(device)).cpu()
               for i in range(0, len(features), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.config.num_latents, self.config.latent_dim)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        if self.encoder is None:
            self.encoder = (self.hub or build_encoder(self.config)).to(device_of(self.model))
        return self.encode(*encoder_features(self.encoder, texts, self.max_tokens, log=lambda _: None))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 256) -> list[str]:
        """Texts of latents (N, L, k), greedy decoding."""
        self.model.eval()
        device = device_of(self.model)
        texts = []
        for i in range(0, len(latents), batch_size):
            ids = self.model.decode(latents[i:i + batch_size].to(device), self.eos, self.hub)
            texts += [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return texts


def _autoencoder_model(cfg: AutoencoderConfig, d_encoder: int, vocab_size: int | None, max_length: int,
                       d_hub: int | None) -> LatentAutoencoder:
    torch.manual_seed(cfg.seed)
    return LatentAutoencoder(d_encoder, cfg.num_latents, cfg.latent_dim, cfg.width, cfg.heads, cfg.perceiver_layers,
                             cfg.reconstruction_layers, vocab_size=vocab_size, decoder_layers=cfg.decoder_layers,
                             max_length=max_length, d_hub_decoder=d_hub, parallel=cfg.decoder == "parallel")


def train_autoencoder(train: TextSplit, cfg: AutoencoderConfig, out_dir: str, *, max_tokens: int,
                      features=None, encoder=None, amp: torch.dtype | None = None, device: str | torch.device = "auto",
                      log: Callable[[str], None] = print) -> tuple[Autoencoder, dict]:
    """Train (or resume, or reuse a finished) autoencoder in ``out_dir`` on ``train.texts``, on ``device``.

    ``features`` = cached (features, mask) of ``train.texts``; computed here when not given (they stay on
    the CPU: each batch is moved to the device).
    Returns the autoencoder and {"steps", "train_seconds", "history", "parameters", "reused"}.
    """
    state = load_trainer_state(out_dir)
    if state is not None and state.get("config") != cfg.model_dump(mode="json"):
        raise UserInputError(f"{out_dir} holds an autoencoder trained with another config; use a new workdir or delete it")
    encoder = encoder or build_encoder(cfg)
    hub = encoder if isinstance(encoder, HubSeq2Seq) else None
    if hub is None:
        tok_dir = os.path.join(out_dir, "tokenizer")
        tokenizer = (CompactVocabulary.load(encoder.tokenizer, tok_dir) if state is not None
                     else CompactVocabulary.build(encoder.tokenizer, train.texts))
    else:
        tokenizer = hub.tokenizer
    ae = Autoencoder(None, cfg, tokenizer, max_tokens, 0, hub, encoder)
    targets = ae.target_ids(train.texts)
    ae.max_length = state["max_length"] if state else min(2 * max_tokens, max(len(t) for t in targets) + 1)
    device = resolve_device(device)
    model = _autoencoder_model(cfg, encoder.dim, len(tokenizer) if hub is None else None, ae.max_length,
                               hub.dim if hub else None).to(device)
    encoder.to(device)  # the frozen encoder (or hub model) too: features of new texts and the hub decoder run there
    ae.model = model
    n_params = sum(p.numel() for p in model.parameters())
    if state is not None:
        load_module(model, os.path.join(out_dir, "model.safetensors"))
        if state["step"] >= cfg.train.steps:
            log(f"autoencoder: reusing finished checkpoint {out_dir}")
            return ae, {"steps": state["step"], "train_seconds": state["train_seconds"], "history": state["history"],
                        "parameters": n_params, "reused": True}
    if features is None:
        features = encoder_features(encoder, train.texts, max_tokens, log=log)
    feats, mask = features
    eos = ae.eos if hub is None else -100

    def batch_loss(step: int) -> torch.Tensor:
        rng, gen = step_generators(cfg.seed, step, device)
        idx = torch.from_numpy(rng.integers(0, len(feats), cfg.train.batch_size))
        latents = model.encode(feats[idx].to(device).float(), mask[idx].to(device))
        if cfg.latent_noise > 0:
            latents = latents + cfg.latent_noise * torch.randn(latents.shape, generator=gen, device=device)
        rows = [targets[i] for i in idx.tolist()]
        if hub is None and cfg.decoder == "parallel":
            inputs, tgt = None, parallel_targets(rows, eos, ae.max_length)
        elif hub is None:
            inputs, tgt = shifted_targets(rows, eos, ae.max_length)
        else:
            T = max(len(r) for r in rows)
            tgt = torch.tensor([r + [-100] * (T - len(r)) for r in rows])
            inputs = None
        return model.reconstruction_loss(latents, None if inputs is None else inputs.to(device), tgt.to(device), hub)

    def save(kind: str, trainer_state: dict) -> None:
        def write(tmp: str) -> None:
            save_module(model, os.path.join(tmp, "model.safetensors"))
            if hub is None:
                tokenizer.save(os.path.join(tmp, "tokenizer"))
            meta = {"autoencoder": cfg.model_dump(mode="json"), "max_tokens": max_tokens, "max_length": ae.max_length,
                    "d_encoder": encoder.dim, "step": trainer_state["step"]}
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(meta, f, indent=2)
            save_trainer_state(tmp, {**trainer_state, "config": cfg.model_dump(mode="json"), "max_length": ae.max_length})
        write_folder_atomic(out_dir, write)

    log(f"autoencoder: {n_params:,} trainable parameters, {len(train.texts)} texts, decoder length {ae.max_length}")
    result = fit(model, batch_loss, cfg.train, save=save, resume_state=state, amp=amp, log=log, label="autoencoder")
    return ae, {"steps": result["step"], "train_seconds": round(result["train_seconds"], 1),
                "history": result["history"], "parameters": n_params, "reused": False}


def load_autoencoder(folder: str, device: str | torch.device = "auto") -> Autoencoder:
    """The autoencoder saved in ``folder`` by :func:`train_autoencoder`, on ``device``."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserInputError(f"{folder}: no autoencoder here (config.json missing); train one with `lmlm diffusion train`")
    with open(path) as f:
        meta = json.load(f)
    cfg = AutoencoderConfig(**meta["autoencoder"])
    hub = HubSeq2Seq(cfg.hub_name) if cfg.hub_name else None
    tokenizer = hub.tokenizer if hub else CompactVocabulary.load(MiniLMEncoder.tokenizer_only(), os.path.join(folder, "tokenizer"))
    device = resolve_device(device)
    model = _autoencoder_model(cfg, meta["d_encoder"], len(tokenizer) if hub is None else None, meta["max_length"],
                               hub.dim if hub else None).to(device)
    if hub is not None:
        hub.to(device)
    load_module(model, os.path.join(folder, "model.safetensors"))
    model.eval()
    return Autoencoder(model, cfg, tokenizer, meta["max_tokens"], meta["max_length"], hub, hub)


# ----------------------------------------------------------------------------- diffusion


@dataclass
class DiffusionModel:
    model: LatentDiffusion  # the EMA weights (for sampling)
    config: DiffusionConfig
    classes: list[str]

    def class_id(self, name: str | None) -> int:
        if name is None:
            return len(self.classes)
        if name not in self.classes:
            raise UserInputError(f"class {name!r}: not a class of this model; choose one of {', '.join(self.classes) or '(none: unconditional)'}")
        return self.classes.index(name)

    @torch.no_grad()
    def sample_latents(self, n: int, class_name: str | None, sampling: SamplingConfig, shape: tuple[int, int], *,
                       seed: int = 0, classifier=None, classifier_scale: float = 0.0, target: int | None = None):
        """``n`` latents (n, L, k) of ``class_name`` (None: unconditional), in batches of ``sampling.batch_size``."""
        device = device_of(self.model)
        gen = torch.Generator(device).manual_seed(seed)
        label = self.class_id(class_name)
        out = []
        for i in range(0, n, sampling.batch_size):
            b = min(sampling.batch_size, n - i)
            labels = torch.full((b,), label, dtype=torch.long, device=device)
            tgt = None if target is None else torch.full((b,), target, dtype=torch.long, device=device)
            out.append(self.model.sample((b, *shape), labels, steps=sampling.steps, sampler=sampling.sampler,
                                         guidance_scale=sampling.guidance_scale, generator=gen, classifier=classifier,
                                         classifier_scale=classifier_scale, target=tgt))
        return torch.cat(out).cpu()


def _diffusion_model(cfg: DiffusionConfig, latent_shape: tuple[int, int], num_classes: int) -> LatentDiffusion:
    torch.manual_seed(cfg.seed)
    L, k = latent_shape
    return LatentDiffusion(Denoiser(k, L, cfg.width, cfg.layers, cfg.heads, num_classes),
                           cfg.logsnr_min, cfg.logsnr_max, cfg.logsnr_shift)


def train_diffusion(latents: torch.Tensor, labels: list[str | None], cfg: DiffusionConfig, out_dir: str, *,
                    amp: torch.dtype | None = None, device: str | torch.device = "auto",
                    log: Callable[[str], None] = print) -> tuple[DiffusionModel, dict]:
    """Train (or resume, or reuse) the latent diffusion model on ``latents`` (N, L, k) in ``out_dir``, on ``device``.

    Classes are the distinct non-missing ``labels``; texts without one train the "no class" branch only.
    """
    state = load_trainer_state(out_dir)
    classes = sorted({label for label in labels if label is not None})
    if state is not None and (state.get("config") != cfg.model_dump(mode="json") or state.get("classes") != classes):
        raise UserInputError(f"{out_dir} holds a diffusion model trained with another config or classes; "
                             "use a new workdir or delete it")
    shape = tuple(latents.shape[1:])
    device = resolve_device(device)
    model = _diffusion_model(cfg, shape, len(classes)).to(device)
    ema = EMA(model, cfg.ema_decay)
    n_params = sum(p.numel() for p in model.parameters())
    if state is not None:
        load_module(model, os.path.join(out_dir, "model.safetensors"))
        load_module(ema.model, os.path.join(out_dir, "ema.safetensors"))
        if state["step"] >= cfg.train.steps:
            log(f"diffusion: reusing finished checkpoint {out_dir}")
            return DiffusionModel(ema.model, cfg, classes), {
                "steps": state["step"], "train_seconds": state["train_seconds"], "history": state["history"],
                "parameters": n_params, "classes": classes, "reused": True}
    y = class_ids(labels, classes).to(device)
    data = latents.float().to(device)

    def batch_loss(step: int) -> torch.Tensor:
        rng, gen = step_generators(cfg.seed, step, device)
        idx = torch.from_numpy(rng.integers(0, len(data), cfg.train.batch_size)).to(device)
        return model.loss(data[idx], y[idx], self_condition_p=cfg.self_condition_p, class_dropout=cfg.class_dropout,
                          generator=gen)

    def save(kind: str, trainer_state: dict) -> None:
        def write(tmp: str) -> None:
            save_module(model, os.path.join(tmp, "model.safetensors"))
            save_module(ema.model, os.path.join(tmp, "ema.safetensors"))
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({"diffusion": cfg.model_dump(mode="json"), "classes": classes, "latent_shape": list(shape),
                           "step": trainer_state["step"]}, f, indent=2)
            save_trainer_state(tmp, {**trainer_state, "config": cfg.model_dump(mode="json"), "classes": classes})
        write_folder_atomic(out_dir, write)

    log(f"diffusion: {n_params:,} parameters, {len(data)} latents of shape {shape}, {len(classes)} classes")
    result = fit(model, batch_loss, cfg.train, save=save, resume_state=state, amp=amp,
                 after_step=lambda step: ema.update(model, step), log=log, label="diffusion")
    return DiffusionModel(ema.model, cfg, classes), {
        "steps": result["step"], "train_seconds": round(result["train_seconds"], 1), "history": result["history"],
        "parameters": n_params, "classes": classes, "reused": False}


def load_diffusion(folder: str, device: str | torch.device = "auto") -> tuple[DiffusionModel, tuple[int, int]]:
    """The EMA diffusion model saved in ``folder`` (on ``device``) and its latent shape (L, k)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserInputError(f"{folder}: no diffusion model here (config.json missing); train one with `lmlm diffusion train`")
    with open(path) as f:
        meta = json.load(f)
    cfg, shape = DiffusionConfig(**meta["diffusion"]), tuple(meta["latent_shape"])
    model = _diffusion_model(cfg, shape, len(meta["classes"])).to(resolve_device(device))
    load_module(model, os.path.join(folder, "ema.safetensors"))
    return DiffusionModel(model.eval(), cfg, meta["classes"]), shape


def sample_texts(checkpoint: str, n: int, class_name: str | None = None, sampling: SamplingConfig | None = None,
                 seed: int = 0, device: str | torch.device = "auto") -> list[str]:
    """``n`` decoded samples from a latent-diffusion workdir (holding ``autoencoder/`` and ``diffusion/``)."""
    for sub in ("autoencoder", "diffusion"):
        if not os.path.isdir(os.path.join(checkpoint, sub)):
            raise UserInputError(f"{checkpoint}: no {sub}/ folder; pass the workdir of `lmlm diffusion train`")
    ae = load_autoencoder(os.path.join(checkpoint, "autoencoder"), device)
    dm, shape = load_diffusion(os.path.join(checkpoint, "diffusion"), device)
    latents = dm.sample_latents(n, class_name, sampling or SamplingConfig(), shape, seed=seed)
    return ae.decode(latents)
