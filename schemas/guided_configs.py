"""Typed configs of the diffusion-guided language modeling flows (DGLM, issue 16): an autoregressive LM steered by a
semantic plan that a diffusion prior proposes and linear attribute classifiers steer.

Defaults are the CPU demo (``make demo-guided``): the ``tiny`` LM shape on 128-token blocks, all-MiniLM-L6-v2 plans,
k = 8 soft tokens, a FiLM-MLP prior, on a synthetic corpus of reviews (topic: the review domain, and sentiment) with some
biographies and other documents.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, NonNegativeFloat, model_validator

from schemas.configs import Config, PretrainConfig, SyntheticCorpusConfig
from schemas.diffusion_configs import TrainingBudget

BIOGRAPHY_CATEGORIES = ["science", "arts", "sports", "business", "politics", "medicine", "law", "engineering"]


class AttributeConfig(Config):
    """An attribute the plan can be steered toward: its labels come from a document column (or, when the shards
    have no such column, the key of the same name in the ``metadata`` JSON)."""

    name: str = Field(description="the name used on the command line: --attribute NAME=VALUE")
    column: str | None = Field(None, description="shard column or metadata key holding the label; unset: the name")
    targets: list[str] = Field(default_factory=list, description="values steered toward in the evaluation; unset: every "
                               "value seen in the labelled documents")

    @property
    def source(self) -> str:
        return self.column or self.name


REVIEW_TOPICS = ["restaurant", "hotel", "book", "film"]


def _default_attributes() -> list[AttributeConfig]:
    # the biography's field (the category column, BIOGRAPHY_CATEGORIES) is not the demo's topic: an LM of the demo's
    # size does not keep it past the first sentence (README, "Status"), so nothing can steer it
    return [AttributeConfig(name="topic", column="domain", targets=REVIEW_TOPICS),
            AttributeConfig(name="sentiment", targets=["positive", "negative"])]


def _lm(seed: int) -> PretrainConfig:
    # 128-token blocks: the examples are at most 48 prefix + 32 continuation tokens
    return PretrainConfig(model="tiny", context_length=128, batch_size=16, token_budget=1_000_000, lr=2e-3, min_lr=2e-4,
                          warmup_steps=50, eval_every=250, checkpoint_every=250, log_every=50, seed=seed)


class PlanDataConfig(Config):
    """(prefix, continuation) examples cut from documents at random token positions, as the reference cuts chunks, half
    of them moved to the nearest sentence start (a prompt of whole sentences is what users and the evaluation give)."""

    continuation_tokens: int = Field(32, ge=4, description="tokens of a continuation (the text a plan embeds)")
    min_prefix_tokens: int = Field(8, ge=1)
    max_prefix_tokens: int = Field(48, ge=1)
    examples_per_doc: int = Field(4, ge=1, description="split points drawn per document (on the demo, with a 700-step "
                                  "fine-tune, 4 gave the same attribute rates as 2 at a lower held-out NLL with the "
                                  "true plan: 0.92 against 0.97)")
    sentence_start_fraction: float = Field(0.5, ge=0, le=1, description="share of split points moved to the nearest "
                                           "sentence start, so the continuation opens a sentence as it does after a "
                                           "prompt of whole sentences (0: random token positions only, as the reference cuts)")
    max_examples: int | None = Field(None, ge=1, description="cap on training examples (a seeded sample)")
    judge_fraction: float = Field(0.3, gt=0, lt=1, description="training documents whose continuations train the "
                                  "evaluation's judges, never the guidance classifiers")
    embed_batch_size: int = Field(256, ge=1)
    seed: int = Field(0)

    @model_validator(mode="after")
    def _prefix_range(self) -> "PlanDataConfig":
        if self.min_prefix_tokens > self.max_prefix_tokens:
            raise ValueError(f"min_prefix_tokens {self.min_prefix_tokens} is above max_prefix_tokens {self.max_prefix_tokens}")
        return self


class PlanLMConfig(Config):
    """The plan fine-tune: the pretrained LM and a soft-prompt generator trained together on noised plans."""

    soft_tokens: int = Field(8, ge=1, description="k: soft-prompt vectors the plan becomes (reference 8)")
    width: int = Field(256, ge=16, description="width of the soft-prompt generator")
    layers: int = Field(2, ge=1, description="FiLM transformer layers of the generator")
    heads: int = Field(4, ge=1)
    noise_augmentation: bool = Field(True, description="train on noised plans z = a x + s eps with the noise level as "
                                     "input (reference); false: always the clean plan (alpha^2 = 1)")
    noise_shift: float = Field(2 * math.log(3), description="log-SNR shift of the training noise levels (reference 2 ln 3: "
                               "mostly mild noise)")
    train_prefix: bool = Field(False, description="the prefix tokens are trained too (reference); false: only the "
                               "continuation, the tokens the plan is about")
    bag_of_words_weight: NonNegativeFloat = Field(0.3, description="weight of the auxiliary loss that reads each soft "
                                                  "vector through the token embeddings as the continuation's bag of "
                                                  "words (0: the reference's NLL alone)")
    prefix_dropout: float = Field(0.8, ge=0, lt=1, description="share of training examples whose prefix is replaced "
                                  "(prefix_dropout_mode) so that only the soft prompt tells what the continuation is "
                                  "about; applies to the class-conditional reference too (0: the reference's training; with 0 neither model followed "
                                  "its prompt against the prefix here, see the README)")
    prefix_dropout_mode: Literal["start", "swap"] = Field("swap", description="start: the prefix becomes the document "
                                                         "start (end-of-text alone); swap: another example's prefix, so "
                                                         "the model learns to follow the prompt where the prefix disagrees")
    prompt_lr_scale: float = Field(1.0, gt=0, description="learning rate of the plan's soft-prompt generator as a "
                                   "multiple of train.lr (that of the pretrained LM). At 3x, a fresh demo workdir's "
                                   "FiLM generator blew up at step ~110 (gradient norm 0.8 -> 1e7, attention and "
                                   "time-MLP weights first; with the global clip the LM then stopped learning, loss "
                                   "2.90 -> 3.28 instead of 2.42); at 1x it stays below 1.3 (below 2.9 with seed 1)")
    train: TrainingBudget = Field(default_factory=lambda: TrainingBudget(
        steps=900, batch_size=32, lr=1e-3, warmup_steps=30, weight_decay=0.01, checkpoint_every=100, log_every=50),
        description="the plan fine-tune's budget: on the demo 350 steps steered sentiment to 0.67, 700 to 0.88, 900 "
                    "(length-grouped) to 0.95 and 1400 to 0.97 (README)")
    length_groups: int = Field(8, ge=1, description="the plan fine-tune's batches are drawn this many at a time, "
                               "sorted by length and dealt out, so a batch holds examples of similar length: 26% of "
                               "the demo's tokens were padding with random batches (1), 13% faster steps. The "
                               "class-conditional reference keeps random batches: grouped, its rates fell (README)")
    seed: int = Field(0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "PlanLMConfig":
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self


class PlanPriorConfig(Config):
    """The prefix-conditioned plan prior: v-prediction, cosine schedule, CFG through a null condition, EMA."""

    width: int = Field(512, ge=16, description="width of the FiLM residual MLP")
    blocks: int = Field(4, ge=1, description="residual blocks")
    cond_dropout: float = Field(0.1, ge=0, le=1, description="prefix condition dropped to the null one (CFG)")
    logsnr_shift: float = Field(0.0, description="added to the cosine schedule's log-SNR")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    train: TrainingBudget = Field(default_factory=lambda: TrainingBudget(
        steps=1000, batch_size=256, lr=1e-3, warmup_steps=100, weight_decay=1e-4, checkpoint_every=500, log_every=250))
    seed: int = Field(0)


class ClassifierConfig(Config):
    """Logistic regressions on clean continuation embeddings, one per attribute."""

    inverse_l2: float = Field(1000.0, gt=0, description="sklearn's C: inverse L2 strength (reference: L2 1e-3)")
    max_iter: int = Field(2000, ge=10)


class GuidedSamplingConfig(Config):
    """How plans are sampled and continuations written."""

    sampler: Literal["ddpm", "ddim"] = Field("ddpm", description="plan sampler (reference: DDPM)")
    steps: int = Field(50, ge=1, description="denoising steps of the plan (reference 250)")
    cfg_scale: float = Field(1.0, ge=0, description="classifier-free guidance of the prefix condition (reference 1 for control)")
    posterior_samples: int = Field(32, ge=1, description="x0 samples per plan in the guidance loss (reference 32)")
    inference_alpha2: float = Field(0.95, ge=0, le=1, description="the sampled plan is re-noised to this alpha^2 (reference 0.95)")
    max_new_tokens: int = Field(32, ge=1)
    top_p: float = Field(0.9, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    repetition_penalty: float = Field(1.2, ge=1)
    batch_size: int = Field(256, ge=1, description="continuations sampled together")


class GuidedEvaluationConfig(Config):
    """The comparison table: held-out neutral prefixes, several continuations each, every system."""

    attributes: list[str] | None = Field(None, description="the attributes evaluated; unset: every configured one")
    prefixes: int = Field(200, ge=1, description="held-out neutral prefixes per attribute")
    samples_per_prefix: int = Field(10, ge=1)
    max_prefix_tokens: int = Field(40, ge=4, description="longest evaluation prefix (whole sentences)")
    prefixes_per_doc: int = Field(2, ge=1)
    guidance_scales: list[NonNegativeFloat] = Field([0.0, 256.0, 1024.0], description="DGLM guidance scales swept "
                                                    "(on the demo the rate grows up to ~256-1024 and the perplexity "
                                                    "does not; 64 steered less, 16 about halfway)")
    boost_deltas: list[NonNegativeFloat] = Field([2.0, 4.0, 6.0], description="attribute-word logit boosts swept")
    boost_words: int = Field(40, ge=1, description="words per attribute value boosted (top log-odds in the labelled text)")
    bootstrap: int = Field(1000, ge=10, description="bootstrap resamples of the prefixes for the 95% intervals")
    sanity_examples: int = Field(500, ge=10, description="held-out examples scored for the NLL and cosine sanity checks")
    alpha2_sweep: list[float] = Field([0.5, 0.8, 0.9, 0.95, 0.99, 1.0], description="inference alpha^2 values whose "
                                      "true-plan NLL is reported (the knob's effect)")
    seed: int = Field(0)


class GuidedFlowConfig(Config):
    """The whole DGLM job: corpus -> LM pretraining (and a reference LM) -> plans -> plan fine-tune and a
    class-conditional reference -> prior -> classifiers -> evaluation."""

    workdir: str = Field("out/guided", description="checkpoints, caches and reports go here")
    document_shards: list[str] = Field(default_factory=list, description="document shard files/folders/globs; unset: a "
                                       "synthetic corpus with reviews is generated")
    synthetic: SyntheticCorpusConfig = Field(
        default_factory=lambda: SyntheticCorpusConfig(n_people=400, n_organisation_docs=40, n_city_docs=20,
                                                      n_no_fact_docs=40, n_review_docs=2400),
        description="the corpus generated when no shards are given")
    holdout_fraction: float = Field(0.1, gt=0, lt=1, description="documents held out (by doc_id hash) from every model; "
                                    "evaluation prefixes come from them (overrides lm/reference_lm.holdout_fraction)")
    attributes: list[AttributeConfig] = Field(default_factory=_default_attributes, min_length=1)
    lm: PretrainConfig = Field(default_factory=lambda: _lm(0), description="the plain LM pretraining (tokenizer: the "
                               "flow's, trained on the training documents)")
    reference_lm: PretrainConfig = Field(default_factory=lambda: _lm(1), description="the separately trained LM that "
                                         "scores perplexity (another seed; never conditioned on a plan)")
    data: PlanDataConfig = Field(default_factory=PlanDataConfig)
    plan_lm: PlanLMConfig = Field(default_factory=PlanLMConfig)
    class_lm: TrainingBudget = Field(
        default_factory=lambda: TrainingBudget(steps=700, batch_size=32, lr=1e-3, warmup_steps=30, weight_decay=0.01,
                                               checkpoint_every=100, log_every=50),
        description="the class-conditional reference model: the pretrained LM fine-tuned with one control vector per "
                    "attribute where the plan's soft prompt goes, on random batches; 900 steps scored no higher than "
                    "700 on the demo (sentiment 0.84 vs 0.86, topic 0.96 both; README)")
    class_prompt_lr_scale: float = Field(3.0, gt=0, description="learning rate of the class-conditional reference's "
                                         "control vectors (embedding tables, nothing to blow up) as a multiple of "
                                         "class_lm.lr")
    class_label_dropout: float = Field(0.3, ge=0, lt=1, description="each attribute's label of a training example is "
                                       "replaced by 'unknown' with this probability while the class-conditional reference "
                                       "trains: the evaluation passes 'unknown' for every attribute but the one it steers, "
                                       "and without it reviews never had an unknown category in training")
    prior: PlanPriorConfig = Field(default_factory=PlanPriorConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    sampling: GuidedSamplingConfig = Field(default_factory=GuidedSamplingConfig)
    evaluation: GuidedEvaluationConfig | None = Field(default_factory=GuidedEvaluationConfig, description="none skips it")
    vocab_size: int = Field(4096, ge=262, description="BPE vocabulary trained on the training documents")
    device: str = Field("auto", description="auto (the first CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads of the flow's process; unset: torch's default")
    parallel: bool = Field(False, description="train the two LMs of a pair (base and reference; plan and class-conditional) "
                           "at once, one process each with threads_per_process threads; false (default): one after the "
                           "other with all the flow's threads, which was 3x faster on 2 cores")
    threads_per_process: int = Field(1, ge=1)
    bf16: Literal["auto"] | bool = Field("auto", description="bfloat16 autocast; auto: where the hardware has it")

    @model_validator(mode="after")
    def _names(self) -> "GuidedFlowConfig":
        names = [a.name for a in self.attributes]
        if len(set(names)) != len(names):
            raise ValueError(f"attribute names repeat: {names}")
        return self
