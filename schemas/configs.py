"""Typed configs of every flow (pydantic, so Prefect renders them as forms in the UI).

Locations are local paths or fsspec URLs (``s3://``, ``gs://``, ``hf://``, ``memory://``,
``file://``). Secrets never appear here: an API key is read from the environment variable
named by the config, never stored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def onto_default(default: BaseModel, given: dict) -> dict:
    """A section given in part (a mapping of some of ``default``'s fields) completed from ``default``, the value its
    parent config gives it, recursively: ``star: {train: {steps: 600}}`` keeps STAR-LDM's other training settings
    (batch 32, its warm-up) instead of the bare TrainingBudget's. A mapping with a key ``default`` does not have is
    left alone, so it validates (and reports a typo) as given."""
    if not set(given) <= set(type(default).model_fields):
        return given
    out = default.model_dump()
    for key, value in given.items():
        current = getattr(default, key)
        out[key] = onto_default(current, value) if isinstance(value, dict) and isinstance(current, BaseModel) else value
    return out


class Config(BaseModel):
    """Every config model: a field the model does not have is an error (a typo must not pass silently). A nested
    section given as a partial mapping keeps the defaults of the fields it does not name (:func:`onto_default`)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _sections_onto_defaults(cls, data):
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, value in data.items():
            field = cls.model_fields.get(key)
            if field is None or not isinstance(value, dict):
                continue
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                out[key] = onto_default(default, value)
        return out


class SyntheticCorpusConfig(Config):
    """The embedded default corpus: fictional biographies with exact ground truth."""

    n_people: int = Field(300, ge=1, description="fictional people, each with >= 8 relations")
    n_organisation_docs: int = Field(40, ge=0, description="documents about organisations")
    n_city_docs: int = Field(20, ge=0, description="documents about cities")
    n_no_fact_docs: int = Field(20, ge=0, description="documents with no tail facts")
    n_review_docs: int = Field(0, ge=0, description="opinion-bearing reviews (restaurants, hotels, books, films) with a "
                               "sentiment label in metadata, half positive; 0 (default) leaves the corpus as it was")
    seed: int = Field(0, description="same seed, same corpus, byte for byte")
    docs_per_file: int = Field(500, ge=1, description="documents per corpus JSONL file")
    compression: str = Field("gz", description="corpus file compression: none, gz or zst")


class IngestConfig(Config):
    """Corpus files -> zstd Parquet document shards."""

    inputs: list[str] = Field(description="files, folders or glob patterns; local or fsspec URLs")
    output: str = Field(description="folder for document and quarantine shards")
    shard_docs: int = Field(50_000, ge=1, description="documents per document shard")
    text_field: str = Field("text", description="text column of JSONL/Parquet inputs")
    id_field: str = Field("id", description="id column; a content hash is used when absent")
    category_field: str | None = Field("category", description="column or metadata key holding a class label")
    workers: int = Field(2, ge=1, description="processes parsing input files in parallel")
    batch_bytes: int = Field(16 << 20, ge=1 << 16, description="bytes read per batch (bounds memory)")


class TaskRunnerConfig(Config):
    """Where a flow's sharded stages run: threads in the flow's process, or a Dask or Ray cluster."""

    kind: Literal["threads", "dask", "ray"] = Field("threads", description="threads (default), dask (prefect-dask) or ray (prefect-ray)")
    address: str | None = Field(
        None, description="an existing cluster (dask: tcp://host:8786, ray: ray://host:10001); unset: a local one"
    )
    workers: int = Field(2, ge=1, description="threads, or workers of the local cluster started when address is unset")


class ValidationConfig(Config):
    enabled: bool = True
    max_calls_per_100_words: float = Field(12.0, gt=0, description="the reference's density filter")
    fail_flow: bool = Field(True, description="stop the flow before the warehouse when a suite fails")


class EndpointConfig(Config):
    """An OpenAI-compatible chat endpoint (OpenAI, a `vllm serve` server, any compatible server)."""

    base_url: str = Field("https://api.openai.com/v1", description="e.g. http://127.0.0.1:8000/v1 for vLLM")
    model: str = Field("gpt-4o", description="model name as the endpoint knows it")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the key (never stored)")
    concurrency: int = Field(8, ge=1, description="requests in flight")
    requests_per_minute: float | None = Field(None, gt=0, description="request rate limit; none when unset")
    tokens_per_minute: float | None = Field(None, gt=0, description="token rate limit; none when unset")
    timeout_s: float = Field(60.0, gt=0, description="per-request timeout")
    max_attempts: int = Field(5, ge=1, description="attempts per document before it is recorded as failed")
    backoff_base_s: float = Field(1.0, gt=0, description="first retry delay; doubles each attempt, with jitter")
    backoff_max_s: float = Field(60.0, gt=0)
    structured_output: str = Field(
        "json_schema", description="json_schema (preferred), json_object, or inline (parse markup from text)"
    )
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(2048, ge=16)
    input_price_per_mtok: float = Field(2.5, ge=0, description="USD per million prompt tokens, for the cost estimate")
    output_price_per_mtok: float = Field(10.0, ge=0, description="USD per million completion tokens")
    global_limit: str | None = Field(
        "llm-endpoint", description="Prefect global concurrency limit every flow run's requests share; none disables"
    )


class AnnotatorConfig(Config):
    """Which annotator annotates documents, and its settings."""

    backend: str = Field("kb-align", description="kb-align, openai, gold, or import")
    prompt_id: str = Field("annotate-v1", description="versioned prompt file under tasks/prompts/")
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    kb: str | None = Field(None, description="kb-align: Parquet/JSON knowledge base (entity, relation, value)")
    import_path: str | None = Field(None, description="import: a reference-format annotated JSON file")
    cache_dir: str | None = Field(None, description="response cache; default <workdir>/cache")


class CorrectorConfig(Config):
    """The correction stage; every step can be switched off and is counted."""

    future_references: bool = Field(True, description="move or drop calls whose entity is not yet introduced")
    placement: bool = Field(True, description="move calls to the value's mention (fuzzy ratio >= placement_ratio)")
    placement_ratio: float = Field(0.9, gt=0, le=1)
    unify_relations: bool = Field(True, description="canonical relation names (rules + embedding clusters)")
    relation_similarity: float = Field(0.85, gt=0, le=1, description="cosine threshold for relation clusters")
    relation_embeddings: bool = Field(
        True, description="cluster relation names by all-MiniLM-L6-v2 embeddings; rules only when false"
    )
    unify_entities: bool = Field(True, description="map entity aliases to one canonical name")
    drop_entity_in_value: bool = True
    drop_relation_in_value: bool = True
    drop_malformed: bool = True
    max_calls_per_100_words: float | None = Field(12.0, description="drop denser documents; none disables")
    fluency_rewrite: bool = Field(False, description="rewrite through the endpoint, kept as a new text version")


# --- pretraining (models/train.py, tasks/pretrain.py) ---

from pydantic import model_validator  # noqa: E402


class PretrainConfig(Config):
    """LMLM or standard-baseline pretraining. Both variants of a comparison share this config, so they
    get the same model shape, tokenizer and token budget (training steps x block tokens)."""

    model: str = Field("tiny", description="micro (smoke tests), tiny (CPU demo), gpt2-124m, llama2-176m, llama2-382m, or a hub name / folder")
    tokenizer: str | None = Field(None, description="folder or hub name; unset: byte-level BPE trained on the corpus")
    vocab_size: int = Field(4096, ge=262, description="vocabulary of a tokenizer trained on the corpus")
    context_length: int | None = Field(None, ge=16, description="block length; unset: the model shape's context")
    batch_size: int = Field(8, ge=1, description="blocks per micro-batch, per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(2e-4, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(50, ge=0)
    token_budget: int = Field(
        3_000_000, ge=1, description="training tokens (steps x processes x batch x accum x block); rounded up to whole steps"
    )
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; when set, overrides token_budget")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay on matrices (not on norms and biases)")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; none disables")
    seed: int = Field(0, description="model init, data order and RNG; same seed, same run")
    bf16: Literal["auto"] | bool = Field(
        "auto", description="bfloat16 autocast; auto: on GPUs that support it and CPUs with native bf16 (AMX/AVX512-BF16)"
    )
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile the model; auto: on CUDA GPUs (1.8x the tokens/s of eager for gpt2-124m on an H200)"
    )
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="most recent checkpoints kept")
    resume: bool = Field(True, description="continue from the newest checkpoint in the output folder, exactly")
    holdout_fraction: float = Field(0.05, ge=0, lt=1, description="documents held out (by doc_id hash) for evaluation")
    eval_every: int = Field(200, ge=1, description="steps between holdout evaluations")
    eval_docs: int = Field(100, ge=1, description="holdout documents scored at each evaluation (the same ones for both variants)")
    log_every: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _lr_range(self) -> "PretrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        return self

    def steps_for(self, tokens_per_step: int) -> int:
        """Optimizer steps of this run, given the tokens one step consumes across all processes."""
        if self.max_steps is not None:
            return self.max_steps
        return -(-self.token_budget // tokens_per_step)


class SeedAnnotationConfig(Config):
    """Seed annotation: a stratified sample, the initial annotator, the corrector."""

    sample_docs: int | None = Field(None, ge=1, description="documents in the seed sample; all when unset")
    stratify_by: str | None = Field("category", description="document column to stratify the sample by")
    sample_seed: int = Field(0, description="same seed and shards, same sample")
    annotator: AnnotatorConfig = Field(default_factory=AnnotatorConfig)
    corrector: CorrectorConfig | None = Field(default_factory=CorrectorConfig, description="none skips correction")


class SeedFlowConfig(Config):
    """The seed-annotation flow on document shards that already exist (e.g. from `lmlm ingest`)."""

    workdir: str = Field("out", description="seed shards go to <workdir>/seed")
    document_shards: list[str] = Field(default_factory=list, description="document shard files, folders or globs (not needed for import)")
    ground_truth: str | None = Field(None, description="synthetic ground-truth folder: scores the seed against gold")
    seed: SeedAnnotationConfig = Field(default_factory=SeedAnnotationConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    warehouse_path: str | None = Field(None, description="DuckDB file; default <workdir>/warehouse.duckdb")
    warehouse_wait_s: float = Field(600.0, ge=0, description="how long loading waits for another writer of the warehouse")


class CorpusFlowConfig(Config):
    """The corpus-processing job: corpus -> shards -> annotation -> warehouse -> validation -> report."""

    workdir: str = Field("out", description="where corpus, shards, warehouse and report go")
    corpus: list[str] | None = Field(
        None, description="corpus files/folders/globs; when unset, the synthetic corpus is generated"
    )
    synthetic: SyntheticCorpusConfig = Field(default_factory=SyntheticCorpusConfig)
    ingest_shard_docs: int = Field(50_000, ge=1)
    ingest_workers: int = Field(2, ge=1)
    seed: SeedAnnotationConfig = Field(default_factory=SeedAnnotationConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    warehouse_path: str | None = Field(None, description="DuckDB file; default <workdir>/warehouse.duckdb")
    warehouse_wait_s: float = Field(600.0, ge=0, description="how long loading waits for another writer of the warehouse")
    task_runner: TaskRunnerConfig = Field(default_factory=TaskRunnerConfig)
    small_annotator: SmallAnnotatorStagesConfig = Field(
        default_factory=lambda: SmallAnnotatorStagesConfig(),
        description="fine-tune the small annotator on the seed and annotate every shard with it (enabled: false skips)")


# --- small annotator: fine-tuning and bulk annotation (models/annotator.py, tasks/finetune.py, tasks/bulk.py) ---


class EncoderFinetuneConfig(Config):
    """The encoder annotator (``models/span_annotator.py``): a pretrained sentence encoder fine-tuned to tag value
    spans, point at entities and name relations; extractive, so its output always strips back to the source."""

    base: str | None = Field(None, description="encoder folder or hub name; unset: the bundled all-MiniLM-L6-v2 (offline)")
    window: int = Field(256, ge=64, le=512, description="word pieces per encoder window; longer documents use overlapping windows")
    epochs: float = Field(10.0, gt=0, description="passes over the training split (time_budget_s may end training first)")
    batch_tokens: int = Field(1024, ge=256, description="padded word pieces per training batch")
    lr: float = Field(2e-4, gt=0, description="peak learning rate of the encoder")
    head_lr: float = Field(3e-3, gt=0, description="peak learning rate of the tag, entity and relation heads")
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    decoder_layers: int = Field(2, ge=1, description="blocks of the relation-name decoder")
    relation_grad: float = Field(0.3, ge=0, le=1, description="share of the relation decoder's loss gradient that "
                                 "trains the encoder (0: the decoder reads the encoder without training it)")
    name_weight: float = Field(1.0, ge=0, description="weight of the relation-name scorer's loss (the scorer picks "
                               "each call's relation among the seed's names, as the corrector unified them)")
    relation_weight: float = Field(1.0, ge=0, description="weight of the relation-name decoder's loss (the decoder "
                                   "writes names word piece by word piece, copying from the context: open vocabulary)")
    frozen_layers: int = Field(3, ge=0, le=12, description="bottom encoder layers kept as pretrained: 3 of MiniLM's 6 "
                               "make a step ~40% cheaper (0.40 vs 0.67 s at 1,024 word pieces on 2 cores)")
    budget_clock: Literal["wall", "cpu"] = Field(
        "wall", description="what time_budget_s counts: wall seconds, or the process's CPU seconds per torch thread "
                            "(reproducible on a machine shared with other jobs)")


class AnnotatorFinetuneConfig(Config):
    """Fine-tuning the small annotator on seed shards. ``kind`` picks the model: ``encoder`` (the default: a
    pretrained encoder fine-tuned to annotate extractively, settings under ``encoder``) or ``generative`` (a causal
    LM that copies the source with calls inserted, loss on the target only: ``base`` is a shape trained from
    scratch with a BPE tokenizer trained on the seed texts, or a hub name / folder fine-tuned with LoRA when
    ``lora_r`` is set, the reference: r 32; served by ``vllm serve`` on GPUs). ``holdout_fraction``,
    ``time_budget_s``, ``seed`` and ``threads`` apply to both kinds; the other fields to ``generative`` only."""

    kind: Literal["encoder", "generative"] = Field("encoder", description="encoder (default, CPU-friendly) or generative")
    encoder: EncoderFinetuneConfig = Field(default_factory=EncoderFinetuneConfig, description="kind encoder: its settings")
    base: str = Field("annotator-small", description="annotator-small / annotator-tiny (from scratch), a models.lmlm shape, or a hub name / folder")
    tokenizer: str | None = Field(None, description="folder or hub name; unset: a byte-level BPE trained on the seed texts (from scratch) or the base's own")
    vocab_size: int = Field(2048, ge=262, description="vocabulary of a tokenizer trained on the seed texts")
    lora_r: int | None = Field(None, ge=1, description="LoRA rank (needs peft); none: full fine-tuning")
    lora_alpha: int = Field(64, ge=1)
    max_source_tokens: int = Field(384, ge=16, description="longer documents are cut into segments of this many source tokens")
    epochs: float = Field(20.0, gt=0, description="passes over the training split")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-3, gt=0, description="peak learning rate (use ~2e-4 for LoRA on a pretrained base)")
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    holdout_fraction: float = Field(0.15, ge=0, lt=1, description="seed documents held out (by doc_id hash) for the quality report")
    time_budget_s: float | None = Field(None, gt=0, description="stop training when this many seconds are spent (the demo's budget)")
    decision_loss: bool = Field(
        False, description="score source positions only as constrained decoding uses them (true token vs "
                           "<|db_entity|>); off (default): full softmax everywhere, which teaches copying")
    seed: int = Field(0, description="same seed and seed shards, same model")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; unset: torch's default")


class BulkAnnotationConfig(Config):
    """Annotating every document shard with the fine-tuned annotator, one output pair per input shard.

    Backends: ``transformers`` (in-process, constrained chunked decoding; the embedded default),
    ``vllm`` (a ``vllm serve`` server at endpoint.base_url, started with ``server_command`` when given),
    ``openai`` (any OpenAI-compatible endpoint, e.g. the strong model when the budget allows)."""

    backend: Literal["transformers", "vllm", "openai"] = Field("transformers")
    checkpoint: str | None = Field(None, description="annotator folder; default <workdir>/annotator/model")
    batch_size: int = Field(16, ge=1, description="transformers: documents decoded together")
    batch_tokens: int = Field(8192, ge=256, description="transformers, encoder annotator: padded word pieces per encoder batch")
    continue_bias: float = Field(1.0, description="encoder annotator: added to the log-probability of a value going on "
                                 "(BIO's I); > 0 makes values longer (its tagger cuts them short: 'August' for "
                                 "'August 16, 1801'); 1.0 was picked on the real seed's held-out contexts (value F1 "
                                 "0.246 -> 0.267)")
    entity: Literal["title", "pointer"] = Field(
        "title", description="encoder annotator: title: a document that opens with a title line (Wikipedia's layout) "
                             "names its title as each fact's entity, the entity pointer elsewhere; pointer: the "
                             "pointer always (on real text its picks lost to the title: (entity, value) F1 0.12 vs 0.17; "
                             "where they differed the pointer was right 10% of the time, the title 46%)")
    relation: Literal["seed", "generate"] = Field(
        "seed", description="encoder annotator: seed: each call's relation is the seed's name (as the corrector "
                            "unified them) the name scorer ranks first; generate: the decoder writes a name, copying "
                            "context words (open vocabulary, far less often right on real text: on Wikipedia, one "
                            "checkpoint, triplet F1 0.014 against the scorer's 0.026). Checkpoints from before the "
                            "scorer always generate")
    chunk_tokens: int = Field(32, ge=1, description="transformers: source tokens fed per forward pass (1 = step by step)")
    draft_tokens: int = Field(8, ge=0, description="transformers: drafted call tokens per forward pass")
    max_call_tokens: int = Field(48, ge=4, description="transformers: a call still open after this many tokens is rolled back")
    max_calls_per_100_words: float | None = Field(
        20.0, gt=0, description="transformers: calls a document segment may open per 100 words (bounds what a poorly "
                                "trained model costs); none: no cap")
    device: str | None = Field(None, description="transformers: cpu, cuda, cuda:1 ...; unset: cuda when available")
    threads: int | None = Field(None, ge=1, description="transformers: torch CPU threads")
    endpoint: EndpointConfig = Field(
        default_factory=lambda: EndpointConfig(base_url="http://127.0.0.1:8000/v1", model="annotator", api_key_env="",
                                               structured_output="inline", concurrency=64, input_price_per_mtok=0,
                                               output_price_per_mtok=0),
        description="vllm/openai: the server; vllm serves the checkpoint under endpoint.model")
    prompt_id: str = Field("annotate-v1", description="openai: prompt file (vllm ignores it: the checkpoint's chat template renders only the document)")
    server_command: list[str] | None = Field(
        None, description="vllm: command that starts the server, e.g. [vllm, serve, <checkpoint>, --port, 8000, "
                          "--served-model-name, annotator]; unset: use a running server")
    server_startup_timeout_s: float = Field(600.0, gt=0, description="vllm: how long to wait for /health")
    shards_in_flight: int = Field(1, ge=1, description="shards annotated at once (threads; >1 pays off for endpoint backends)")
    task_runner: TaskRunnerConfig | None = Field(
        None, description="where the per-shard tasks run: dask/ray spread shards over a cluster (each worker loads the "
                          "checkpoint or speaks to the server itself); unset: threads, shards_in_flight at once")
    corrector: CorrectorConfig | None = Field(None, description="correction after annotation; none keeps the annotator's calls")


class SmallAnnotatorStagesConfig(Config):
    """The corpus flow's fine-tune -> bulk-annotation stages (after seed annotation and correction)."""

    enabled: bool = Field(False, description="chain fine-tuning and bulk annotation into the corpus flow")
    seed_docs: int = Field(160, ge=1, description="seed sample size when seed.sample_docs is unset (the rest is annotated in bulk)")
    min_f1: float | None = Field(
        0.25, ge=0, le=1, description="quality gate: below this held-out seed (entity, value) F1 the corpus is not annotated "
                                      "with the fine-tuned model and nothing of it reaches the warehouse (the paper's 8B "
                                      "student reaches ~0.40 against its teacher on real text); none: no gate")
    below_min_f1: Literal["stop", "seed_only"] = Field(
        "stop", description="below min_f1: stop (the run fails with one line) or seed_only (the run goes on without "
                            "bulk annotation and loads the seed's annotations only; the report and the CLI say so)")
    finetune: AnnotatorFinetuneConfig = Field(default_factory=AnnotatorFinetuneConfig)
    bulk: BulkAnnotationConfig = Field(default_factory=BulkAnnotationConfig)


class FinetuneFlowConfig(Config):
    """The annotator fine-tune flow on seed shards that already exist (e.g. from `lmlm seed`)."""

    workdir: str = Field("out", description="the checkpoint goes to <workdir>/annotator/model")
    seed_shards: list[str] = Field(description="annotated seed shard files, folders or globs")
    finetune: AnnotatorFinetuneConfig = Field(default_factory=AnnotatorFinetuneConfig)


class BulkFlowConfig(Config):
    """The bulk-annotation flow over document shards that already exist."""

    workdir: str = Field("out", description="outputs go to <workdir>/bulk/{annotated,triplets}")
    document_shards: list[str] = Field(description="document shard files, folders or globs")
    bulk: BulkAnnotationConfig = Field(default_factory=BulkAnnotationConfig)
    min_f1: float | None = Field(
        0.25, ge=0, le=1, description="quality gate: a local checkpoint whose stored fine-tune report's held-out seed "
                                      "(entity, value) F1 is below this is refused before any shard is annotated; none: "
                                      "no gate (a checkpoint without a stored report, e.g. a served model, is not gated)")
    ground_truth: str | None = Field(None, description="synthetic ground-truth folder: scores the output against gold")
    exclude_from_scoring: list[str] = Field(default_factory=list, description="annotated shards whose documents are not scored (the seed the model was trained on)")
    load_warehouse: bool = Field(True, description="load the bulk shards into <workdir>/warehouse.duckdb (or warehouse_path)")
    warehouse_path: str | None = Field(None)
    warehouse_wait_s: float = Field(600.0, ge=0)


class ResultsPageConfig(Config):
    """Where `lmlm report` (and the evaluation flows) find the newest reports, and where the page goes."""

    lmlm: str | None = Field("out/demo-lmlm", description="LMLM workdir (its lmlm/evaluation-report.json) or report file")
    diffusion: str | None = Field("out/diffusion-demo", description="latent-diffusion workdir (its report.json) or report file")
    annotator: str | None = Field(
        "out/demo", description="corpus-run workdir with the small-annotator stages (its report.json) or report file")
    out_dir: str = Field("out/results", description="results.md, results.html and their PNGs go here")
