"""Typed configs of the latent-diffusion flows (LD4LG): text autoencoder, latent diffusion, evaluation.

Defaults are the embedded default (frozen all-MiniLM-L6-v2 encoder, small decoder trained from scratch,
sized to train on a 2-core CPU); the paper's setups are the ``bart-base`` / ``flan-t5-base`` backbones.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, model_validator

from schemas.configs import Config, SyntheticCorpusConfig

# Hugging Face names of the paper's backbones (encoder and decoder both frozen); loaded from the hub.
HUB_BACKBONES = {"bart-base": "facebook/bart-base", "flan-t5-base": "google/flan-t5-base"}


class TrainingBudget(Config):
    """Optimizer settings shared by every model of these flows."""

    steps: int = Field(2000, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0, description="peak learning rate (linear warmup, cosine decay to lr/10)")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(500, ge=1, description="steps between resumable checkpoints (one is written at the end)")
    log_every: int = Field(100, ge=1)


class AutoencoderConfig(Config):
    """Frozen encoder -> Perceiver resampler -> latents -> reconstruction network -> decoder."""

    backbone: str = Field(
        "minilm",
        description="minilm (embedded default: frozen all-MiniLM-L6-v2 + small decoder trained here); "
        "bart-base, flan-t5-base or a hub seq2seq name: encoder and decoder frozen (paper setup, needs the hub)",
    )
    num_latents: int = Field(32, ge=1, description="latent vectors per text (reference 32)")
    latent_dim: int = Field(64, ge=2, description="dimensions per latent (reference 64)")
    perceiver_layers: int = Field(3, ge=1, description="Perceiver resampler layers (reference 3)")
    reconstruction_layers: int = Field(2, ge=1, description="layers mapping latents back to decoder features")
    width: int = Field(128, ge=16, description="width of the resampler and reconstruction network (and of the minilm decoder)")
    heads: int = Field(4, ge=1)
    decoder: Literal["parallel", "autoregressive"] = Field(
        "autoregressive", description="minilm backbone: decoder trained from scratch; autoregressive (its language model "
        "turns imperfect sampled latents into fluent text: MAUVE 0.6-0.7 vs 0.3 for parallel in the demo) or parallel "
        "(all tokens in one pass: faster decoding, same reconstruction)")
    decoder_layers: int = Field(1, ge=1, description="minilm backbone: layers of the decoder")
    latent_noise: float = Field(0.3, ge=0, description="std of Gaussian noise added to latents in training (decoder robustness "
                                "to the imperfect latents diffusion samples)")
    train: TrainingBudget = Field(default_factory=lambda: TrainingBudget(steps=1700, batch_size=32, lr=2e-3))
    seed: int = Field(0, description="same seed, same model")

    @model_validator(mode="after")
    def _heads_divide(self) -> "AutoencoderConfig":
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self

    @property
    def hub_name(self) -> str | None:
        """The hub model of a frozen seq2seq backbone; None for the embedded minilm default."""
        if self.backbone == "minilm":
            return None
        return HUB_BACKBONES.get(self.backbone, self.backbone)


class DiffusionConfig(Config):
    """The latent denoiser: pre-LN transformer with dense skips, v-prediction, cosine schedule (sigmoid-λ form)."""

    width: int = Field(128, ge=16)
    layers: int = Field(6, ge=2, description="transformer layers; the second half gets skips from the first (U-Net style)")
    heads: int = Field(4, ge=1)
    self_condition_p: float = Field(0.5, ge=0, le=1, description="training steps that condition on the model's own x0 estimate")
    class_dropout: float = Field(0.1, ge=0, le=1, description="label dropped to 'no class' (classifier-free guidance)")
    logsnr_min: float = Field(-15.0, description="λ at t=1")
    logsnr_max: float = Field(15.0, description="λ at t=0")
    logsnr_shift: float = Field(-2.0, description="added to λ(t): negative puts more training weight on noisier latents "
                                "(high-dimensional latents, here 32 x 64, keep their structure at a given λ longer)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of the weights used for sampling")
    # class accuracy is bought with data passes (bench/diffusion_steps.py): 3,000 steps at 2e-3 is what the
    # demo's 20-minute CPU budget affords; 6,000 x 256 on a GPU reaches 0.83 at MAUVE 0.79
    train: TrainingBudget = Field(default_factory=lambda: TrainingBudget(steps=3000, batch_size=64, lr=2e-3))
    seed: int = Field(0)

    @model_validator(mode="after")
    def _shape(self) -> "DiffusionConfig":
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.logsnr_min >= self.logsnr_max:
            raise ValueError(f"logsnr_min {self.logsnr_min} must be below logsnr_max {self.logsnr_max}")
        return self


class SamplingConfig(Config):
    sampler: Literal["ddpm", "ddim"] = Field("ddim", description="ddpm (ancestral, reference 250 steps) or ddim (deterministic, faster)")
    steps: int = Field(50, ge=1, description="denoising steps")
    guidance_scale: float = Field(2.0, ge=0, description="classifier-free guidance w: 0 unconditional, 1 conditional, >1 guided")
    batch_size: int = Field(256, ge=1)


class DiffusionEvaluationConfig(Config):
    samples_per_class: int = Field(40, ge=1, description="samples drawn per class for every generator compared")
    extra_guidance_scales: list[NonNegativeFloat] = Field(
        [3.0], description="further classifier-free guidance weights evaluated besides sampling.guidance_scale (each a "
        "row of the table): larger w, higher class accuracy, lower MAUVE")
    reference_lm: str | None = Field(None, description="folder (or hub name) of a causal LM for perplexity; skipped when unset")
    classifier_guidance_scale: float = Field(
        1.0, ge=0, description="strength of the latent-classifier gradient (DGLM-style guidance); larger raises class "
        "accuracy and ruins fluency (demo, 800 diffusion steps: scale 1 MAUVE 0.42 / accuracy 0.60, scale 3 0.04 / 0.74)")
    latent_classifier: TrainingBudget = Field(default_factory=lambda: TrainingBudget(steps=300, batch_size=128, lr=2e-3, warmup_steps=30))
    ar_baseline: TrainingBudget | None = Field(
        default_factory=lambda: TrainingBudget(steps=500, batch_size=32, lr=2e-3, warmup_steps=50),
        description="class-conditional causal LM trained from scratch on the same text; none skips it",
    )
    mauve_seed: int = Field(25)


class LatentDiffusionFlowConfig(Config):
    """The whole LD4LG job: text from shards -> autoencoder -> latent diffusion -> samples -> evaluation."""

    workdir: str = Field("out/diffusion", description="checkpoints, samples and report go here")
    document_shards: list[str] = Field(default_factory=list, description="document shard files/folders/globs; unset: a synthetic corpus is generated")
    synthetic: SyntheticCorpusConfig = Field(
        default_factory=lambda: SyntheticCorpusConfig(n_people=1600, n_organisation_docs=200, n_city_docs=100, n_no_fact_docs=100),
        description="the corpus generated when no shards are given",
    )
    label_column: str | None = Field("category", description="document column holding the class label; none trains unconditionally")
    max_tokens: int = Field(
        64, ge=4, description="longest training text in encoder tokens; longer sentences are dropped. 64 holds most whole "
        "paragraphs of the synthetic corpus (3-6 sentences), so a text carries its document's class (32 often does not)")
    pack_sentences: bool = Field(True, description="pack consecutive sentences of a paragraph up to max_tokens; false: one sentence per text")
    max_texts: int | None = Field(None, ge=1, description="cap on training texts (a seeded sample); all when unset")
    holdout_fraction: float = Field(0.1, gt=0, lt=1, description="documents held out (by doc_id hash) for evaluation")
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    evaluation: DiffusionEvaluationConfig | None = Field(default_factory=DiffusionEvaluationConfig, description="none skips evaluation")
    device: str = Field("auto", description="where the models train and sample: auto (the first CUDA GPU when PyTorch "
                        "sees one, else the CPU), cpu, cuda or cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; unset: torch's default")
    bf16: Literal["auto"] | bool = Field("auto", description="bfloat16 autocast; auto: where the hardware has it (AMX CPUs, GPUs)")
