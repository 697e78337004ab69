"""``lmlm serve``: one Prefect deployment per flow, scheduled or on demand, served by this process.

Each flow registers itself with one line in :data:`REGISTRY`; the UI then offers a "Run" form rendered
from the flow's pydantic parameters, and a cron schedule from :class:`ServeConfig` (``schedules``,
by flow name) makes it run on its own. The serving process executes every run it is given (scheduled
or triggered from the UI or API) in a subprocess of its own; ``prefect.yaml`` holds the same
deployments for work-pool workers instead.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

from pydantic import Field

from schemas.configs import Config, CorpusFlowConfig
from schemas.errors import UserInputError

LLM_LIMIT = "llm-endpoint"  # the default EndpointConfig.global_limit
log = logging.getLogger("lmlm.serve")


class ServeConfig(Config):
    """What ``lmlm serve`` registers: schedules, default parameters, and shared limits."""

    workdir: str = Field("out/serve", description="where served runs write (their configs' workdir default)")
    schedules: dict[str, str | None] = Field(
        default_factory=lambda: {"corpus-processing": "0 2 * * *"},
        description="cron schedule (UTC) per flow name; a flow not listed, or listed as null, runs on demand",
    )
    corpus: CorpusFlowConfig | None = Field(
        None, description="parameters of scheduled corpus-processing runs; unset: the synthetic corpus in workdir"
    )
    llm_limit: str = Field(LLM_LIMIT, description="Prefect global concurrency limit on LLM endpoint calls "
                           "(the name annotator configs give as endpoint.global_limit)")
    llm_slots: int = Field(8, ge=1, description="LLM endpoint calls in flight across all flow runs")
    max_runs: int | None = Field(None, ge=1, description="flow runs this process executes at once; unset: no limit")


@dataclass(frozen=True)
class Registration:
    """A flow ``lmlm serve`` deploys: its entrypoint ``module:attribute``, and default parameters built
    from the serve config (None: the flow's own defaults, filled in the UI form)."""

    entrypoint: str
    parameters: Callable[[ServeConfig], dict] | None = None
    description: str = ""
    one_at_a_time: bool = False  # runs of this deployment write the same folder: queue them


def _corpus_parameters(cfg: ServeConfig) -> dict:
    config = cfg.corpus or CorpusFlowConfig(workdir=cfg.workdir)
    return {"config": config.model_dump(mode="json")}


def _seed_parameters(cfg: ServeConfig) -> dict:
    """The document shards the scheduled corpus runs write; scored against gold when the corpus is synthetic."""
    corpus = cfg.corpus or CorpusFlowConfig(workdir=cfg.workdir)
    w = corpus.workdir
    config = {"workdir": w, "document_shards": [os.path.join(w, "shards", "documents")],
              "seed": corpus.seed.model_dump(mode="json")}
    if corpus.corpus is None:
        config["ground_truth"] = os.path.join(w, "synthetic", "ground_truth")
    return {"config": config}


def _finetune_parameters(cfg: ServeConfig) -> dict:
    w = (cfg.corpus or CorpusFlowConfig(workdir=cfg.workdir)).workdir
    return {"config": {"workdir": w, "seed_shards": [os.path.join(w, "seed", "annotated")]}}


def _bulk_parameters(cfg: ServeConfig) -> dict:
    w = (cfg.corpus or CorpusFlowConfig(workdir=cfg.workdir)).workdir
    return {"config": {"workdir": w, "document_shards": [os.path.join(w, "shards", "documents")]}}


def _results_parameters(cfg: ServeConfig) -> dict:
    w = (cfg.corpus or CorpusFlowConfig(workdir=cfg.workdir)).workdir
    return {"config": {"lmlm": w, "annotator": w, "out_dir": os.path.join(w, "results")}}


# One line per flow. Later flows (LMLM pretraining, evaluation, autoencoder, diffusion) add theirs
# here, e.g. Registration("flows.pretrain:pretraining") (the flow's own defaults fill the UI form).
REGISTRY: list[Registration] = [
    Registration("flows.corpus:corpus_processing", _corpus_parameters, one_at_a_time=True,
                 description="corpus -> document shards -> annotation -> validation -> warehouse; new files only"),
    Registration("flows.seed:seed_annotation", _seed_parameters, one_at_a_time=True,
                 description="annotate a stratified seed sample of existing document shards, load the warehouse"),
    Registration("flows.annotator:annotator_finetune", _finetune_parameters, one_at_a_time=True,
                 description="(re)train the small annotator on the annotated seed shards; loss curve, held-out scores"),
    Registration("flows.annotator:bulk_annotation", _bulk_parameters, one_at_a_time=True,
                 description="annotate every document shard with the fine-tuned annotator, load the warehouse"),
    *(Registration(f"flows.lmlm:{name}", lambda c: {"config": {"workdir": (c.corpus or CorpusFlowConfig(workdir=c.workdir)).workdir}}, one_at_a_time=True) for name in ("lmlm_pretraining", "lmlm_evaluation")),
    Registration("flows.report:results_report", _results_parameters,
                 description="render the newest evaluation reports into the results page (Markdown, HTML, artifact)"),
    *(Registration(f"flows.guided:{name}", lambda c: {"config": {"workdir": os.path.join(c.workdir, "guided")}}, one_at_a_time=True)
      for name in ("guided_training", "guided_evaluation", "guided_demo")),
    *(Registration(f"flows.star:{name}", lambda c: {"config": {"workdir": os.path.join(c.workdir, "guided")}}, one_at_a_time=True)
      for name in ("star_training", "star_evaluation", "star_demo")),
]


def load_flow(entrypoint: str):
    """The flow object at ``module:attribute``."""
    module, _, attr = entrypoint.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UserInputError(f"flow {entrypoint!r} cannot be loaded ({exc}); fix its line in flows/serve.py REGISTRY")


def build_deployments(cfg: ServeConfig) -> list:
    """One RunnerDeployment per registered flow, named ``<flow name>/<scheduled|on-demand>``."""
    from prefect.deployments.runner import EntrypointType

    from warehouse.db import code_version

    known = {load_flow(r.entrypoint).name for r in REGISTRY}
    unknown = sorted(set(cfg.schedules) - known)
    if unknown:
        raise UserInputError(f"schedules names unknown flow(s) {unknown}; registered flows are {sorted(known)}")
    deployments = []
    for reg in REGISTRY:
        flow = load_flow(reg.entrypoint)
        cron = cfg.schedules.get(flow.name)
        deployments.append(flow.to_deployment(
            name="scheduled" if cron else "on-demand",
            cron=cron,
            parameters=reg.parameters(cfg) if reg.parameters else None,
            description=reg.description or (flow.description or ""),
            tags=["lmlm"],
            version=code_version(),
            concurrency_limit=1 if reg.one_at_a_time else None,
            entrypoint_type=EntrypointType.MODULE_PATH,  # runs load the flow by module name, from any folder
        ))
    return deployments


def ensure_global_limit(name: str, slots: int) -> bool:
    """Create (or resize to ``slots``) the global concurrency limit ``name`` on the Prefect server.

    Returns False, with a warning, when no server answers: endpoint calls then run unlimited.
    """
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            try:
                current = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
                return True
            if current.limit != slots or not current.active:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=slots, active=True))
            return True
    except (httpx.HTTPError, OSError, RuntimeError) as exc:
        log.warning("global concurrency limit %r not set (%s); LLM endpoint calls run without a shared limit",
                    name, exc)
        return False


def serve(cfg: ServeConfig) -> None:
    """Register every deployment and execute their runs until interrupted (Ctrl-C or SIGTERM)."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise UserInputError("lmlm serve needs a Prefect server: start one (prefect server start) and "
                             "export PREFECT_API_URL=http://127.0.0.1:4200/api")
    deployments = build_deployments(cfg)  # a bad config fails before anything is registered
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        unhealthy = client.api_healthcheck()
    if unhealthy is not None:
        raise UserInputError(f"no Prefect server answers at PREFECT_API_URL={PREFECT_API_URL.value()} ({unhealthy}); "
                             "start one (prefect server start) or fix the URL")
    ensure_global_limit(cfg.llm_limit, cfg.llm_slots)
    prefect_serve(*deployments, limit=cfg.max_runs)
