"""Typed configs of STAR-LDM (issue 17): one LM trained with next-token NLL and the plan's v-loss, that thinks by
diffusion in the plan space before it writes.

STAR-LDM builds on DGLM's pieces and its workdir layout: the tokenizer, the pretrained LM (its starting point), the
reference LM and the plan examples are DGLM's stages (``lmlm guided train --stage lm --stage plans``, run by ``lmlm
star train`` when missing); STAR-LDM adds ``<workdir>/star`` (the model) and ``<workdir>/star_classifiers``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, NonNegativeFloat, model_validator

from schemas.configs import Config, EndpointConfig
from schemas.diffusion_configs import TrainingBudget
from schemas.guided_configs import GuidedFlowConfig, GuidedSamplingConfig

THINK_MODES = ("once", "every-sentence", "off")


class StarModelConfig(Config):
    """The joint model: the pretrained LM, DGLM's soft-prompt generator and a score head on [soft ; LM features]."""

    init: Literal["lm", "plan_lm"] = Field("plan_lm", description="what the joint training starts from. plan_lm: "
                                           "DGLM's plan-conditioned LM and its generator, a writer that already reads "
                                           "plans (the generator's shape must be DGLM's; DGLM's plan_lm stage is "
                                           "trained first when missing). lm: the pretrained plain LM and a new "
                                           "generator, as the reference starts from GPT-2; in 600 steps its writer "
                                           "barely learned to read a plan (README)")
    soft_tokens: int = Field(8, ge=1, description="k: soft tokens of the plan (reference 8)")
    width: int = Field(256, ge=16, description="width of the soft-prompt generator")
    layers: int = Field(2, ge=1, description="FiLM transformer layers of the generator")
    heads: int = Field(4, ge=1)
    head_width: int = Field(256, ge=16, description="width of the score head")
    head_layers: int = Field(2, ge=1, description="FiLM transformer layers of the score head (CPU scale of the "
                             "reference's 6)")
    diffusion_weight: NonNegativeFloat = Field(5.0, description="w in NLL + w * weighted v-MSE (reference 5)")
    extra_noise_draws: int = Field(0, ge=0, description="more noise draws per example for the v-loss alone, each a pass "
                                   "over the k soft tokens against the prefix's cached keys and values (cheap next to "
                                   "the full pass; 0: one draw, as the reference). Measured with 3: 1.7x the training "
                                   "time, and thoughts no closer to the real continuation (MiniLM cosine 0.349 vs 0.343)")
    noise_shift: float = Field(2 * math.log(3), description="log-SNR shift of the training noise levels, seen by the "
                               "writer and the v-loss alike (2 ln 3: mostly mild noise, as DGLM's writer, where "
                               "star.init plan_lm starts, was trained; 0: the unshifted cosine schedule, as the "
                               "reference); the v-loss is importance-weighted back to the unshifted schedule's "
                               "objective, so only where the draws fall changes")
    null_share: float = Field(0.1, ge=0, lt=1, description="examples whose LM features the head sees replaced by the "
                              "learned null (classifier-free guidance; reference 0.1)")
    prefix_dropout: float = Field(0.5, ge=0, lt=1, description="share of examples whose prefix is another example's "
                                  "(DGLM's swap): the writer learns to follow the plan against the prefix; those rows "
                                  "train the NLL only, not the v-loss (their prefix says nothing of the plan)")
    bag_of_words_weight: NonNegativeFloat = Field(0.3, description="DGLM's auxiliary loss reading each soft vector as "
                                                  "the continuation's bag of words (0: NLL and v-loss alone)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of the weights, which the model thinks and writes "
                             "with (reference 0.999; the usual warm-up, decay min(d, (1+step)/(10+step)), makes it about "
                             "0.993 at 1200 steps); 0: the last step's weights (steered and wrote less well on the demo, README)")
    prompt_lr_scale: float = Field(1.0, gt=0, description="learning rate of the generator and the head as a multiple of "
                                   "train.lr (that of the LM); with noise_shift 2 ln 3, 3x made the training diverge")
    train: TrainingBudget = Field(default_factory=lambda: TrainingBudget(
        steps=1200, batch_size=32, lr=1e-3, warmup_steps=50, weight_decay=1e-4, checkpoint_every=100, log_every=50),
        description="the joint training's budget: on the demo, sentiment 0.920 at 600 steps, 0.927 at 900, 0.974 over "
                    "4 seeds at 1200; 1200 steps of 16 examples, or grouped by length, did worse (README)")
    seed: int = Field(0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "StarModelConfig":
        for name, width in (("width", self.width), ("head_width", self.head_width)):
            if width % self.heads:
                raise ValueError(f"{name} {width} is not divisible by heads {self.heads}")
        return self


class NoisyClassifierConfig(Config):
    """Noise-conditioned attribute classifiers on z_t (the reference: an MLP of residual FiLM blocks)."""

    width: int = Field(384, ge=16)
    blocks: int = Field(4, ge=1)
    train: TrainingBudget = Field(default_factory=lambda: TrainingBudget(
        steps=400, batch_size=256, lr=1e-3, warmup_steps=50, weight_decay=1e-4, checkpoint_every=400, log_every=200))
    seed: int = Field(0)


class StarSamplingConfig(GuidedSamplingConfig):
    """A thought (the plan's denoising steps with the prefix cached), then writing."""

    steps: int = Field(15, ge=1, description="denoising steps of a thought (reference 50; here 15 gave plans closer "
                       "to the real continuation's than 50 with DDPM, at 0.3x the cost)")
    think: Literal["once", "every-sentence", "off"] = Field("once", description="once: think at the end of the prompt "
                                                            "(reference); every-sentence: think again after every "
                                                            "sentence the model ends; off: a null plan (pure noise)")
    logsnr_shift: float = Field(2 * math.log(3), description="log-SNR shift of the sampling schedule (reference 2 ln 3)")
    min_sentence_tokens: int = Field(4, ge=1, description="every-sentence: tokens a segment has before a sentence end "
                                     "can close it")


class StarEvaluationConfig(Config):
    """STAR-LDM's tables: control beside DGLM, open-ended quality against the plain LM, ablations."""

    guidance_scales: list[NonNegativeFloat] = Field([0.0, 1.0, 1.5, 3.0, 10.0], description="STAR-LDM guidance scales "
                                                    "swept (reference example 3; on the demo the sentiment rate peaked "
                                                    "at 1.5 with and without the EMA, and fell past 3)")
    compare_dglm: bool = Field(True, description="DGLM's rows on the same prefixes when the workdir has a trained DGLM "
                               "(plan_lm, prior, classifiers)")
    open_prefixes: int = Field(1000, ge=10, description="held-out prefixes of the open-ended comparison (at most the "
                               "held-out examples there are; one continuation each per draw, against the held-out real "
                               "continuations; MAUVE of 300 texts moved by about 0.05 between draws here)")
    draws: int = Field(3, ge=1, description="draws (sampling seeds) of the open-ended comparison of the plain LM, "
                       "thinking once and thinking off; ± over them")
    ablation_draws: int = Field(1, ge=1, description="draws of each ablation (step counts, think every sentence)")
    mauve_kmeans_seeds: int = Field(10, ge=1, description="k-means clusterings averaged per MAUVE figure (its "
                                    "quantization alone moved MAUVE by a std of 0.02-0.03 on the same texts here; "
                                    "over 10 draws, one clustering put thinking 0.017 ahead of thinking off, 10 put "
                                    "it 0.007 ahead)")
    step_ablation: list[int] = Field([5, 15, 50], description="denoising steps of a thought compared open-ended")
    cost_batch: int = Field(16, ge=1, description="batch of the thought-cost measurement")
    judge: EndpointConfig | None = Field(None, description="an OpenAI-compatible judge of pairwise coherence (STAR-LDM vs "
                                         "the plain LM; key from the environment only); unset: skipped with a note")
    judge_pairs: int = Field(100, ge=1, description="open-ended pairs sent to the judge (each asked in both orders)")
    seed: int = Field(0)


class StarFlowConfig(GuidedFlowConfig):
    """The STAR-LDM job; the DGLM fields (corpus, LMs, plan data, attributes, evaluation prefixes) are shared."""

    workdir: str = Field("out/star", description="checkpoints, caches and reports go here (a DGLM workdir works: the "
                         "shared stages are reused)")
    star: StarModelConfig = Field(default_factory=StarModelConfig)
    star_classifier: NoisyClassifierConfig = Field(default_factory=NoisyClassifierConfig)
    star_sampling: StarSamplingConfig = Field(default_factory=StarSamplingConfig)
    star_evaluation: StarEvaluationConfig | None = Field(default_factory=StarEvaluationConfig, description="none skips it")
