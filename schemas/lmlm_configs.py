"""Typed configs of the LMLM pretraining and evaluation flows (pydantic, so Prefect renders them as forms).

Both flows start from a workdir that ``lmlm run`` wrote (its ``report.json`` names the annotated
shards, the warehouse and, for the synthetic corpus, the ground truth) and write under
``<workdir>/lmlm`` unless told otherwise.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.configs import Config, EndpointConfig, PretrainConfig

Variant = Literal["lmlm", "standard"]

# The CPU demo: the tiny shape on 256-token blocks, 1.2M training tokens per variant. Both variants
# train at once as two one-thread processes: ~7 minutes on an idle 2-core machine, ~16 while others train.
DEMO_PRETRAIN = dict(model="tiny", context_length=256, batch_size=8, token_budget=1_200_000, eval_every=200,
                     checkpoint_every=200, log_every=50)


class LMLMEvaluationConfig(Config):
    """What ``lmlm_evaluation`` measures, and on how much. Metrics that need the synthetic ground truth
    (bios, cloze probes, edits) are skipped when there is none."""

    checkpoints: dict[str, str] = Field(
        default_factory=dict, description="variant -> checkpoint folder; unset: the newest of <out_dir>/<variant>")
    ground_truth: str | None = Field(
        None, description="synthetic ground_truth folder; unset: <workdir>/synthetic/ground_truth when it exists")
    lookup_db: str | None = Field(
        None, description="lookup database (.parquet or .json from `lmlm warehouse export-lookup-db`); "
                          "unset: the workdir's warehouse facts view")
    lookup_mode: Literal["exact", "fuzzy", "trie"] = Field(
        "exact", description="exact (normalised key + aliases), fuzzy (all-MiniLM-L6-v2) or trie (constrained decoding)")
    perplexity_docs: int = Field(50, ge=1, description="held-out annotated documents scored for normalized perplexity")
    bio_people: int = Field(60, ge=0, description="people asked for a bio (FActScore); 0 skips")
    bio_prompt: str = Field("Tell me a bio of {entity}. {entity} is", description="bio prompt; {entity} is the name")
    bio_max_new_tokens: int = Field(200, ge=8, description="calls count: a looked-up fact costs ~15 tokens")
    length_penalty_gamma: float = Field(10.0, gt=0, description="FActScore length penalty: x exp(1 - gamma/facts) below gamma facts")
    cloze_probes: int = Field(240, ge=0, description="T-REx/LAMA-style cloze probes from the ground truth; 0 skips")
    cloze_max_new_tokens: int = Field(32, ge=4)
    edit_facts: int = Field(100, ge=0, description="facts edited, then deleted, in a copy of the warehouse; 0 skips")
    include_holdout_people: bool = Field(
        False, description="also probe people whose biography was held out of training (only the LMLM can know them)")
    document_start: bool = Field(
        False, description="bio, cloze and edit prompts follow an end-of-text token (a document's opening); "
                           "false: running text. The tiny demo LMLM copies the subject's name into its calls "
                           "only without it for the instruction-style bio prompt")
    judge: EndpointConfig | None = Field(
        None, description="an OpenAI-compatible judge for FActScore with an LLM (key from the environment only)")
    judge_max_responses: int = Field(30, ge=1, description="bios sent to the judge per variant")
    batch_size: int = Field(16, ge=1, description="prompts generated together")
    seed: int = Field(0, description="which people, probes and facts are sampled")


class LMLMFlowConfig(Config):
    """Pretrain the LMLM and its standard baseline on the same annotated shards, and evaluate both."""

    workdir: str = Field("out/demo", description="a workdir `lmlm run` wrote (report.json, shards, warehouse)")
    annotated_shards: list[str] = Field(
        default_factory=list, description="annotated shard files/folders/globs; unset: the ones in <workdir>/report.json")
    out_dir: str | None = Field(None, description="checkpoints and reports; default <workdir>/lmlm")
    variants: list[Variant] = Field(default_factory=lambda: ["lmlm", "standard"], min_length=1)
    pretrain: PretrainConfig = Field(default_factory=lambda: PretrainConfig(**DEMO_PRETRAIN),
                                     description="shared by every variant: same shape, tokenizer and token budget")
    parallel: bool = Field(True, description="train the variants at once, one process each (CPU machines)")
    threads_per_process: int = Field(1, ge=1, description="torch CPU threads of each training process")
    evaluation: LMLMEvaluationConfig = Field(default_factory=LMLMEvaluationConfig)
