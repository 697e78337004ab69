"""Bulk annotation: every document shard through the fine-tuned annotator, resumable per shard.

Backends (``BulkAnnotationConfig.backend``):

- ``transformers``: :class:`TransformersAnnotator`, in-process constrained chunked decoding
  (``models.annotator_decode.annotate_texts``); the output cannot alter the source.
- ``vllm``: a ``vllm serve`` server speaking the OpenAI protocol, through the same client as the
  initial annotator (:class:`tasks.annotate_openai.OpenAIAnnotator`, inline output). The checkpoint's
  chat template renders only the document, so the few-shot prompt is ignored by the model; the
  answer is verified against the source and repaired (realigned, broken calls dropped, counted).
  :func:`managed_server` starts the server with a configured command and stops it afterwards.
- ``openai``: any OpenAI-compatible endpoint with the configured prompt.

Per input shard ``tasks.annotate.annotate_shard`` writes the annotated and triplet shards atomically
and a completion marker keyed by the input shard's hash and the annotator version, so a rerun skips
finished shards and a crash loses at most the shards in flight.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request


from schemas.configs import AnnotatorConfig, BulkAnnotationConfig
from schemas.errors import UserInputError
from schemas.documents import Annotation, Document
from schemas.reports import BulkStageReport, ShardAnnotationReport
from tasks.annotate import annotate_shard


class TransformersAnnotator:
    """The fine-tuned annotator in this process (implements :class:`tasks.annotate.Annotator`).

    Outputs are source-preserving by construction (constrained decoding); ``stats`` sums the decoding
    cost over every ``annotate`` call.
    """

    prompt_id = None

    def __init__(self, checkpoint: str, cfg: BulkAnnotationConfig):
        import torch

        from models.annotator import load_annotator
        from models.annotator_decode import DecodeOptions, DecodeStats

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model, self.tokenizer, meta = load_annotator(checkpoint, cfg.device)
        self.name = "lmlm-annotator"
        self.version = meta.get("version") or _folder_version(checkpoint)
        self.options = DecodeOptions(chunk_tokens=cfg.chunk_tokens, draft_tokens=cfg.draft_tokens,
                                     batch_size=cfg.batch_size, max_call_tokens=cfg.max_call_tokens,
                                     max_calls_per_100_words=cfg.max_calls_per_100_words,
                                     max_source_tokens=meta.get("max_source_tokens", 384))
        self.stats = DecodeStats()

    def annotate(self, docs: list[Document]) -> list[Annotation]:
        from models.annotator_decode import annotate_texts
        from schemas import markup

        out = []
        for doc, got in zip(docs, annotate_texts(self.model, self.tokenizer, [d.text for d in docs], self.options,
                                                  self.stats)):
            out.append(Annotation(doc_id=doc.doc_id, annotated_text=markup.render(got.annotated)))
        return out


def _folder_version(checkpoint: str) -> str:
    """A version for a checkpoint without annotator.json: its config and weight files' sizes and times."""
    import hashlib

    h = hashlib.sha1()
    for name in sorted(os.listdir(checkpoint)):
        st = os.stat(os.path.join(checkpoint, name))
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return "folder+" + h.hexdigest()[:12]


def build_bulk_annotator(cfg: BulkAnnotationConfig, checkpoint: str, cache_dir: str):
    """The configured bulk annotator, built once per process (its ``stats`` sum over every shard it did)."""
    return _cached_annotator(cfg.model_dump_json(), os.path.abspath(checkpoint), os.path.abspath(cache_dir))


@functools.cache
def _cached_annotator(cfg_json: str, checkpoint: str, cache_dir: str):
    cfg = BulkAnnotationConfig.model_validate_json(cfg_json)
    from models.span_annotator import is_span_annotator

    if is_span_annotator(checkpoint):  # the encoder kind runs in process whatever the backend says
        if cfg.backend != "transformers":
            raise UserInputError(f"bulk.backend {cfg.backend}: {checkpoint} is an encoder annotator, which runs in "
                                 "process; set bulk.backend: transformers (or fine-tune with finetune.kind: generative)")
        from tasks.annotate_encoder import EncoderAnnotator

        return EncoderAnnotator(checkpoint, cfg)
    if cfg.backend == "transformers":
        return TransformersAnnotator(checkpoint, cfg)
    from tasks.annotate_openai import OpenAIAnnotator

    endpoint = cfg.endpoint
    if cfg.backend == "vllm" and endpoint.structured_output != "inline":
        endpoint = endpoint.model_copy(update={"structured_output": "inline"})  # the model writes markup
    annotator = OpenAIAnnotator(AnnotatorConfig(backend="openai", prompt_id=cfg.prompt_id, endpoint=endpoint),
                                cache_dir)
    if cfg.backend == "vllm":
        annotator.name = f"vllm:{endpoint.model}"
        annotator.version = f"{endpoint.model}@{_checkpoint_version(checkpoint)}"
    return annotator


def _checkpoint_version(checkpoint: str) -> str:
    import json

    meta = os.path.join(checkpoint, "annotator.json")
    if os.path.exists(meta):
        return json.load(open(meta)).get("version", "unknown")
    return _folder_version(checkpoint) if os.path.isdir(checkpoint) else "external"


def server_healthy(base_url: str, timeout_s: float = 2.0) -> bool:
    """Whether an OpenAI-compatible server answers ``GET /health`` (vLLM's liveness route) with 200."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(root + "/health", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def managed_server(cfg: BulkAnnotationConfig, log=print, poll_s: float = 0.5):
    """A server at ``cfg.endpoint.base_url`` for the duration of the block.

    A server that already answers /health is used as is. Otherwise ``cfg.server_command`` is started
    in its own process group, /health is polled until ``server_startup_timeout_s``, and on exit the
    process group is terminated (then killed). No command and no server is one clear error.
    """
    base_url = cfg.endpoint.base_url
    if server_healthy(base_url):
        log(f"bulk annotation: using the running server at {base_url}")
        yield None
        return
    if not cfg.server_command:
        raise UserInputError(f"bulk.endpoint.base_url {base_url}: no server answers /health; start one "
                             "(e.g. `vllm serve <checkpoint> --served-model-name annotator`) or set bulk.server_command")
    log(f"bulk annotation: starting {' '.join(cfg.server_command)}")
    try:
        proc = subprocess.Popen(cfg.server_command, start_new_session=True, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise UserInputError(f"bulk.server_command {cfg.server_command[0]!r}: cannot start it ({exc})") from None
    try:
        deadline = time.monotonic() + cfg.server_startup_timeout_s
        while not server_healthy(base_url):
            if proc.poll() is not None:
                raise UserInputError(f"bulk.server_command exited with status {proc.returncode} before {base_url}/health "
                                     "answered; run it by hand to see why")
            if time.monotonic() > deadline:
                raise UserInputError(f"bulk.server_command: {base_url} did not answer /health within "
                                     f"{cfg.server_startup_timeout_s:g} s; raise bulk.server_startup_timeout_s")
            time.sleep(poll_s)
        log(f"bulk annotation: server ready at {base_url} (pid {proc.pid})")
        yield proc
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Terminate the server's process group; kill it when it does not exit within ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bulk_annotate_shard(doc_shard: str, cfg: BulkAnnotationConfig, checkpoint: str, out_dir: str, run_id: str,
                        cache_dir: str) -> ShardAnnotationReport:
    """One document shard -> annotated + triplet shards under ``out_dir`` (skipped when already done
    for this input and annotator version)."""
    annotator = build_bulk_annotator(cfg, checkpoint, cache_dir)
    return annotate_shard(annotator, doc_shard, out_dir, run_id, corrector=cfg.corrector,
                          batch_docs=max(cfg.batch_size * 8, 64))



def bulk_report(shard_reports: list[ShardAnnotationReport], cfg: BulkAnnotationConfig, checkpoint: str,
                seconds: float, cache_dir: str) -> BulkStageReport:
    """The bulk stage's totals over its shard reports; documents/s over the shards processed in this run.

    With threads (no task runner), this process's annotator did the work: its decoding counters are
    added as ``annotator_stats``."""
    from dataclasses import asdict, is_dataclass

    processed = [r for r in shard_reports if not r.skipped]
    docs_processed = sum(r.docs for r in processed)
    stats = None
    if processed and cfg.task_runner is None:
        got = build_bulk_annotator(cfg, checkpoint, cache_dir).stats
        stats = asdict(got) if is_dataclass(got) else got.model_dump()
    return BulkStageReport(
        backend=cfg.backend, checkpoint=os.path.abspath(checkpoint), shards=len(shard_reports),
        shards_processed=len(processed), shards_skipped=len(shard_reports) - len(processed),
        docs=sum(r.docs for r in shard_reports), annotated=sum(r.annotated for r in shard_reports),
        failed=sum(r.failed for r in shard_reports), rejected=sum(r.rejected for r in shard_reports),
        repaired=sum(r.repaired for r in shard_reports), calls=sum(r.calls for r in shard_reports),
        seconds=round(seconds, 3),
        docs_per_s=round(docs_processed / max(sum(r.seconds for r in processed), 1e-9), 3) if processed else None,
        annotated_shards=[r.annotated_shard for r in shard_reports],
        triplet_shards=[r.triplet_shard for r in shard_reports],
        per_shard=[r.model_dump(include={"shard", "skipped", "docs", "annotated", "failed", "repaired", "calls",
                                         "seconds"}) for r in shard_reports],
        annotator_stats=stats)
