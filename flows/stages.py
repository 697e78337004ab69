"""Every stage function of ``tasks/`` as a Prefect task: names, retries and caching declared here, once.

The functions themselves know nothing of Prefect (docs/architecture.md); a flow calls these wrappers so
each stage is a task run with its own state, logs and timing in the UI. Stages that take live objects
(an annotator with its client and cache, a model) are not cached: Prefect must not hash them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.logs import attach_stage_logs
from flows.progress import attach_run_progress
from flows.runners import process_pool, run_module
from schemas.configs import IngestConfig
from schemas.errors import UserInputError
from schemas.reports import IngestReport
from tasks.bulk import bulk_annotate_shard
from tasks.diffusion import train_autoencoder, train_diffusion
from tasks.evaluate_annotation import score_against_gold
from tasks.evaluate_diffusion import evaluate_generators, holdout_reconstruction
from tasks.evaluate_guided import evaluate_guided
from tasks.evaluate_lmlm import evaluate_variant
from tasks.finetune import finetune_annotator
from tasks.guided import train_classifiers, train_guided_tokenizer, train_plan_prior, train_soft_prompt_lm
from tasks.guided_data import prepare_plan_data
from tasks.ingest import ingest_corpus
from tasks.load import load_warehouse, reviewed_overrides
from tasks.profile import profile_document_shard
from tasks.results_page import render_results_page
from tasks.seed import annotate_seed, sample_seed_documents
from tasks.synthetic import generate_corpus
from tasks.validate import validate_annotations, validate_documents, validate_warehouse

attach_stage_logs()
attach_run_progress()


def ingest(config: IngestConfig, run_id: str) -> IngestReport:
    """``tasks.ingest.ingest_corpus`` with its files spread over ``config.workers`` local processes."""
    return ingest_corpus(config, run_id, runner=process_pool(config.workers))


def pretrain_in_process(cfg_json: str, shards: list[str], out: str, variant: str, threads: int) -> dict:
    """One variant trained by ``python -m tasks.pretrain`` in a process of its own with ``threads`` CPU
    threads (so two variants train at once without sharing an interpreter); returns its report."""
    os.makedirs(out, exist_ok=True)
    config_path = os.path.join(out, "pretrain-config.json")
    Path(config_path).write_text(cfg_json)
    log_path = os.path.join(out, "train.log")
    logger = get_run_logger()
    logger.info("%s: python -m tasks.pretrain --variant %s --out %s (log %s)", variant, variant, out, log_path)

    def progress(line: str) -> None:  # progress in the run log (and the CLI), everything in train.log
        if " step " in line or "pretrain" in line:
            logger.info("%s: %s", variant, line.split(" ", 2)[-1])

    try:
        run_module("tasks.pretrain", ["--variant", variant, "--out", out, "--config", config_path, *shards],
                   log_path=log_path, threads=threads, on_line=progress)
    except UserInputError as exc:
        raise UserInputError(f"{variant}: {exc}") from None
    return json.loads(Path(out, "report.json").read_text())


def pretrain_here(cfg, shards: list[str], out: str, variant: str, threads: int) -> dict:
    """One variant trained in this process (with ``threads`` torch threads)."""
    import torch

    from tasks.pretrain import pretrain

    torch.set_num_threads(threads)
    return pretrain(cfg, shards, out, variant).model_dump()


# corpus processing
generate_corpus_task = task(generate_corpus, name="generate-synthetic-corpus")
ingest_task = task(ingest, name="ingest")
profile_document_shard_task = task(profile_document_shard, name="profile-document-shard")
validate_documents_task = task(validate_documents, name="validate-documents")
validate_annotations_task = task(validate_annotations, name="validate-annotations")
validate_warehouse_task = task(validate_warehouse, name="validate-warehouse")
load_warehouse_task = task(load_warehouse, name="load-warehouse")
reviewed_overrides_task = task(reviewed_overrides, name="read-reviewed-aliases")
score_against_gold_task = task(score_against_gold, name="score-against-gold")

# seed annotation (the annotator is a live object: clients, caches)
sample_seed_task = task(sample_seed_documents, name="sample-seed-documents", cache_policy=NO_CACHE)
annotate_seed_task = task(annotate_seed, name="annotate-seed", cache_policy=NO_CACHE)

# the small annotator
finetune_annotator_task = task(finetune_annotator, name="finetune-annotator", cache_policy=NO_CACHE)
bulk_annotate_shard_task = task(bulk_annotate_shard, name="bulk-annotate-shard", cache_policy=NO_CACHE, retries=1)

# latent diffusion (models and batches are live objects)
train_autoencoder_task = task(train_autoencoder, name="train-autoencoder", cache_policy=NO_CACHE)
holdout_reconstruction_task = task(holdout_reconstruction, name="holdout-reconstruction", cache_policy=NO_CACHE)
train_diffusion_task = task(train_diffusion, name="train-diffusion", cache_policy=NO_CACHE)
evaluate_generators_task = task(evaluate_generators, name="evaluate-generators", cache_policy=NO_CACHE)

# LMLM pretraining (two variants at once: each in a process of its own, or one after the other here) and evaluation
pretrain_process = task(pretrain_in_process, name="pretrain-in-process", cache_policy=NO_CACHE)
pretrain_variant = task(pretrain_here, name="pretrain-variant", cache_policy=NO_CACHE)
evaluate_variant_task = task(evaluate_variant, name="evaluate-lmlm-variant", cache_policy=NO_CACHE)

# the results page (its inputs are report files that change between runs: never cached)
render_results_page_task = task(render_results_page, name="render-results-page", cache_policy=NO_CACHE)


def guided_finetune_in_process(config_json: str, kind: str, threads: int) -> dict:
    """One DGLM fine-tune (``plan`` or ``class``) by ``python -m tasks.guided finetune`` in a process of its own with
    ``threads`` CPU threads (so the two fine-tunes train at once); returns its report."""
    from tasks.guided import folder

    config = json.loads(config_json)
    workdir = config.get("workdir", "out/guided")
    logs = os.path.join(workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    config_path = os.path.join(logs, f"{kind}-lm-config.json")
    Path(config_path).write_text(config_json)
    log_path = os.path.join(logs, f"{kind}-lm.log")
    logger = get_run_logger()
    logger.info("%s LM: python -m tasks.guided finetune --kind %s (log %s)", kind, kind, log_path)

    def progress(line: str) -> None:
        if " step " in line or "LM" in line:
            logger.info("%s", line.split(" ", 2)[-1])

    run_module("tasks.guided", ["finetune", "--kind", kind, "--config", config_path], log_path=log_path,
               threads=threads, on_line=progress)
    return json.loads(Path(folder(workdir, kind), "report.json").read_text())


# diffusion-guided language modeling (DGLM)
guided_tokenizer_task = task(train_guided_tokenizer, name="guided-tokenizer")
plan_data_task = task(prepare_plan_data, name="prepare-plans", cache_policy=NO_CACHE)
guided_finetune_process = task(guided_finetune_in_process, name="guided-finetune-in-process", cache_policy=NO_CACHE)
soft_prompt_lm_task = task(train_soft_prompt_lm, name="train-soft-prompt-lm", cache_policy=NO_CACHE)
plan_prior_task = task(train_plan_prior, name="train-plan-prior", cache_policy=NO_CACHE)
attribute_classifiers_task = task(train_classifiers, name="fit-attribute-classifiers", cache_policy=NO_CACHE)
evaluate_guided_task = task(evaluate_guided, name="evaluate-guided", cache_policy=NO_CACHE)
