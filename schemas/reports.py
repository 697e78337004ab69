"""The typed report every stage returns, and the run reports the flows compose from them.

A stage function in ``tasks/`` returns one of these; a flow passes it on to the next stage as it is and
dumps it to JSON once, when it writes the run's ``report.json``. Counts never disagree silently: a
report whose numbers do not reconcile refuses to exist.
"""

from __future__ import annotations

from pydantic import BaseModel, model_validator


# ---------------------------------------------------------------- ingest and profile


class IngestReport(BaseModel):
    """What one ingest run did. Counts are records: lines, Parquet rows, .txt files, unreadable files."""

    run_id: str
    output: str
    files_seen: int = 0
    files_ingested: int = 0
    files_skipped: int = 0  # already ingested: same fingerprint or checksum in the manifest
    files_unreadable: int = 0  # not read to the end (quarantined as unreadable_file); retried next run
    docs_read: int = 0
    docs_written: int = 0
    duplicates: int = 0
    quarantined: int = 0
    bytes_read: int = 0  # uncompressed input bytes
    seconds: float = 0.0
    document_shards: list[str] = []
    quarantine_shards: list[str] = []
    quarantine_reasons: dict[str, int] = {}

    @model_validator(mode="after")
    def _reconciles(self) -> "IngestReport":
        if self.docs_read != self.docs_written + self.duplicates + self.quarantined:
            raise ValueError(f"bug: read {self.docs_read} != written {self.docs_written} + duplicates "
                             f"{self.duplicates} + quarantined {self.quarantined}")
        if sum(self.quarantine_reasons.values()) != self.quarantined:
            raise ValueError(f"bug: quarantine reasons {self.quarantine_reasons} do not add up to {self.quarantined}")
        if self.files_seen != self.files_ingested + self.files_skipped + self.files_unreadable:
            raise ValueError("bug: files seen != ingested + skipped + unreadable")
        return self

    @property
    def docs_per_second(self) -> float:
        return self.docs_read / self.seconds if self.seconds else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds else 0.0


class ShardProfile(BaseModel):
    """Counts of one document shard, and which worker (host:pid) computed them."""

    shard: str
    documents: int
    words: int
    characters: int
    categories: dict[str, int]
    worker: str


class CorpusProfile(BaseModel):
    """The corpus-wide totals of the per-shard profiles, and the task runner that computed them."""

    shards: int
    documents: int
    words: int
    characters: int
    categories: dict[str, int]
    workers: list[str]
    task_runner: str
    per_shard: list[ShardProfile]


# ---------------------------------------------------------------- validation


class ExpectationOutcome(BaseModel):
    """One expectation's verdict; ``unexpected_examples`` are ids of offending rows, never texts."""

    expectation: str  # GX type, e.g. "expect_column_values_to_be_unique"
    column: str | None  # None for table-level expectations
    success: bool
    unexpected_count: int
    unexpected_examples: list[str]
    table: str = ""  # which checked table ("documents", "triplets", ...)
    observed: str | None = None  # table-level observation (e.g. the row count) or GX's error


class ValidationReport(BaseModel):
    suite: str
    success: bool
    n_rows: int  # rows checked, all tables together
    outcomes: list[ExpectationOutcome]
    seconds: float

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def markdown(self) -> str:
        """The report as a Markdown table (for a Prefect markdown artifact and the run report)."""
        failed = len(self.failures)
        verdict = "passed" if self.success else f"**FAILED** ({failed} of {len(self.outcomes)} expectations)"
        lines = [
            f"### Validation `{self.suite}`: {verdict}",
            "",
            f"{self.n_rows:,} rows checked in {self.seconds:.2f} s.",
            "",
            "| table | expectation | column | result | unexpected | examples |",
            "|---|---|---|---|---:|---|",
        ]
        for o in self.outcomes:
            examples = ", ".join(f"`{md_cell(e)}`" for e in o.unexpected_examples)
            if o.observed is not None:
                examples = (examples + " " if examples else "") + f"observed: {md_cell(o.observed)}"
            lines.append(
                f"| {o.table} | {o.expectation} | {md_cell(o.column or '')} | {'✅' if o.success else '❌'} "
                f"| {o.unexpected_count:,} | {examples} |"
            )
        return "\n".join(lines) + "\n"


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:120]




# ---------------------------------------------------------------- annotation


class AnnotatorInfo(BaseModel):
    backend: str
    name: str
    version: str
    prompt_id: str | None = None


class ShardAnnotationReport(BaseModel):
    """What annotating one document shard did; nothing is dropped without a count and a reason."""

    shard: str
    skipped: bool = False  # outputs already complete for this input and annotator version
    docs: int = 0
    annotated: int = 0
    failed: int = 0  # annotator errors: recorded in failures/, retried on the next run
    rejected: int = 0  # dropped by the corrector (e.g. density), recorded in rejected/ with the reason
    repaired: int = 0  # outputs whose stripped text drifted from the source and were realigned
    calls: int = 0
    failure_reasons: dict[str, int] = {}
    corrector_counts: dict[str, dict[str, int]] = {}
    relation_aliases: list[dict] = []
    entity_aliases: list[dict] = []
    seconds: float = 0.0
    annotated_shard: str | None = None
    triplet_shard: str | None = None


class SeedStageReport(ShardAnnotationReport):
    """The seed stage: a sample of the corpus annotated by the strong annotator and corrected."""

    annotator: AnnotatorInfo
    sample_shard: str
    endpoint: dict | None = None  # endpoint annotators: requests, retries, tokens, estimated cost
    quality_vs_gold: dict | None = None  # with a synthetic ground truth: triplet and span P/R/F1
    validation: ValidationReport | None = None


class FinetuneReport(BaseModel):
    """What fine-tuning did and how good the annotator is on the held-out seed documents."""

    checkpoint: str
    version: str  # the annotator version recorded in annotated shards
    reused: bool = False  # an up-to-date checkpoint existed: not retrained
    base: str
    parameters: int
    train_docs: int
    holdout_docs: int
    train_examples: int
    steps: int = 0
    epochs: float = 0.0
    train_seconds: float = 0.0
    final_train_loss: float | None = None
    final_holdout_loss: float | None = None
    holdout_quality: dict = {}  # precision, recall, f1, span_*, source_preserved_rate, ...
    history: list[dict] = []  # the training curve: {"step","epoch","loss","lr"} and {"step","holdout_loss"}
    curve_png: str | None = None  # the training curve as a plot, when the flow drew one


class QualityGateReport(BaseModel):
    """The check between fine-tuning and bulk annotation: is the small annotator good enough to annotate the corpus?"""

    measure: str = "held-out seed (entity, value) F1"
    figure: float | None  # the fine-tune report's figure; None when nothing was held out (the gate then passes)
    threshold: float | None  # small_annotator.min_f1; None: no gate
    passed: bool
    action: str  # "bulk annotation", "stop" or "seed only": what the run did next
    decision: str  # one line for the operator: the figure, the threshold and, below it, what to do


class BulkStageReport(BaseModel):
    """Every document shard annotated by the small annotator (finished shards skipped)."""

    backend: str
    checkpoint: str
    shards: int
    shards_processed: int
    shards_skipped: int
    docs: int
    annotated: int
    failed: int
    rejected: int
    repaired: int
    calls: int
    seconds: float
    docs_per_s: float | None  # over the shards processed in this run
    annotated_shards: list[str]
    triplet_shards: list[str]
    per_shard: list[dict]
    annotator_stats: dict | None = None  # decoding counters of the in-process annotator
    quality_vs_gold: dict | None = None  # with a synthetic ground truth, on documents not in the seed


# ---------------------------------------------------------------- warehouse and the run


class RunRecord(BaseModel):
    """A flow run as the warehouse's ``runs`` table records it (lineage of every row it loads)."""

    run_id: str
    flow: str
    config: dict
    inputs: list[str]


class WarehouseLoad(BaseModel):
    """What one load puts into the warehouse: shards, the corrector's alias proposals, and the run."""

    run: RunRecord
    documents: list[str]
    annotated: list[str] = []
    triplets: list[str] = []
    relation_aliases: list[dict] = []  # proposals, stored for review (reviewed = false)
    entity_aliases: list[dict] = []


class WarehouseLoadReport(BaseModel):
    """What one load added (per table: rows inserted / already there) and what the warehouse then holds."""

    documents_loaded: dict
    annotations_loaded: dict
    triplets_loaded: dict
    relation_aliases_proposed: int = 0
    entity_aliases_proposed: int = 0
    documents: int
    triplets: int
    facts: int
    conflicts: int


class SkippedValidation(BaseModel):
    success: bool = True
    skipped: bool = True


class CorpusRunReport(BaseModel):
    """One run of the corpus-processing flow (``<workdir>/report.json``)."""

    run_id: str
    started_at: str
    finished_at: str | None = None
    code_version: str
    workdir: str
    warehouse: str
    synthetic: dict | None = None  # the generated corpus: where it and its ground truth are, what they hold
    ingest: IngestReport | None = None
    profile: CorpusProfile | None = None
    validation: dict[str, ValidationReport | SkippedValidation] = {}
    seed_annotation: SeedStageReport | None = None
    finetune: FinetuneReport | None = None
    quality_gate: QualityGateReport | None = None
    bulk_annotation: BulkStageReport | None = None
    warehouse_load: WarehouseLoadReport | None = None
    relations: dict[str, int] = {}
    timings_s: dict[str, float] = {}
    shards: dict[str, str] = {}

    def to_json_dict(self) -> dict:
        """The report as written to report.json: stages that did not run are absent, alias proposals (in
        the warehouse) and the fine-tuning curve (in the annotator's own report) left out."""
        data = self.model_dump(mode="json", exclude={"seed_annotation": {"relation_aliases", "entity_aliases",
                                                                          "validation"},
                                                     "finetune": {"history"}})
        return {k: v for k, v in data.items() if v is not None}


# ---------------------------------------------------------------- training


class PretrainReport(BaseModel):
    variant: str
    model: str
    parameters: int  # distinct trainable parameters
    vocab_size: int
    context_length: int
    world_size: int
    steps: int
    tokens: int  # training tokens, all processes
    tokens_per_s: float  # all processes, this session's optimizer steps only
    train_seconds: float
    wall_seconds: float  # this call, tokenizer training and evaluation included
    train_docs: int
    holdout_docs: int  # documents scored for the holdout figures
    final_train_loss: float | None  # mean over the last 5% of steps (at least the last one)
    holdout_loss: float | None  # per trained token
    holdout_normalized_perplexity: float | None  # exp(summed loss / tokens of the call-free text)
    mfu: float | None  # model FLOPs utilisation per device (6N rule); None where the peak is unknown
    checkpoint: str
    tokenizer: str
    loss_curve: str
    history: list[dict]




# ---------------------------------------------------------------- results page


class ResultsPage(BaseModel):
    """The results page `lmlm report` and the evaluation flows write: where it is, what it was built from."""

    markdown_path: str
    html_path: str
    images: list[str]  # PNGs next to the page
    sources: dict[str, str | None]  # section -> the report file it was rendered from (None: none found)
    markdown_inline: str  # the page with its images embedded as data URIs (a Prefect markdown artifact)

# ---------------------------------------------------------------- diffusion-guided language modeling (DGLM)


class PlanDataReport(BaseModel):
    """The (prefix, continuation) examples and their plans (``tasks.guided_data``)."""

    folder: str
    documents: int
    examples: dict[str, int]  # per role: train, judge, holdout
    labelled: dict[str, int]  # per attribute: training examples with a label
    reused: bool


class SoftPromptLMReport(BaseModel):
    """A fine-tune of the pretrained LM with a soft prompt: the plan LM, or the class-conditional reference."""

    kind: str  # "plan" or "class"
    folder: str
    lm_parameters: int
    prompt_parameters: int
    soft_tokens: int
    steps: int
    train_seconds: float
    final_loss: float | None
    reused: bool
    history: list[dict] = []


class PlanPriorReport(BaseModel):
    folder: str
    parameters: int
    steps: int
    train_seconds: float
    final_loss: float | None
    reused: bool
    history: list[dict] = []


class AttributeClassifierReport(BaseModel):
    """One logistic regression on clean plan embeddings: what it learned from and how well it reads held-out plans."""

    name: str
    path: str
    classes: list[str]
    train_examples: int
    holdout_examples: int
    holdout_accuracy: float | None
    seconds: float


class GuidedTrainingReport(BaseModel):
    """``lmlm guided train``: every stage's report (pretraining reports as tasks.pretrain wrote them)."""

    workdir: str
    shards: list[str]
    tokenizer: str
    lm: dict | None = None
    reference_lm: dict | None = None
    plans: PlanDataReport | None = None
    plan_lm: SoftPromptLMReport | None = None
    class_lm: SoftPromptLMReport | None = None
    prior: PlanPriorReport | None = None
    classifiers: list[AttributeClassifierReport] = []
    stage_seconds: dict[str, float] = {}


class Interval(BaseModel):
    """A figure with its bootstrap 95% interval over prefixes."""

    value: float
    low: float
    high: float


class GuidedRow(BaseModel):
    """One system at one setting, on one attribute's neutral prefixes."""

    attribute: str
    system: str  # uncontrolled LM, DGLM, STAR-LDM, logit boost, class-conditional
    setting: str
    knob: float | None  # the guidance scale or the boost delta swept
    continuations: int
    attribute_rate: Interval  # the independent tf-idf judge
    lexicon_rate: Interval | None = None  # sentiment: the VADER lexicon judge
    perplexity: Interval  # of the continuation given the prefix, under the reference LM
    dist_1: Interval
    dist_2: Interval
    dist_3: Interval
    plan_rate: float | None = None  # DGLM, STAR-LDM: the guidance classifier's mean p(target) of the sampled plans
    seconds: float


class GuidedEvaluationReport(BaseModel):
    rows: list[GuidedRow]
    prefixes: dict[str, int]  # attribute -> neutral prefixes scored
    prefix_neutrality: dict[str, dict]  # attribute -> judge's mean top-class probability on the prefixes, label mix
    judges: dict[str, dict]  # attribute -> held-out accuracy of each judge (tf-idf; VADER for sentiment)
    sanity: dict  # NLL with true / shuffled / no plan; cosine to own vs shuffled plan; alpha^2 sweep
    goals: dict[str, dict]  # attribute -> the goals, measured
    examples: dict[str, list[dict]]
    seconds: float
