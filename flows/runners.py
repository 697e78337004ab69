"""Where a flow's sharded stages run: threads (default), a Dask cluster (prefect-dask) or a Ray cluster (prefect-ray).

A flow keeps its own code the same whatever the runner; a stage that does the same work on every
shard calls :func:`map_over_shards`, which runs it as a subflow on the runner the flow's
``task_runner`` config names. Dask and Ray are optional installs: choosing one that is not installed
is one clear error naming the package.
"""

from __future__ import annotations

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from schemas.configs import TaskRunnerConfig
from schemas.errors import UserInputError


def build_task_runner(cfg: TaskRunnerConfig):
    """The Prefect task runner ``cfg`` describes; a local cluster of ``cfg.workers`` workers unless ``cfg.address``."""
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    if cfg.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise UserInputError("task_runner.kind 'dask' needs prefect-dask: pip install prefect-dask "
                                 "(or use task_runner.kind 'threads')") from None
        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        # one single-threaded worker process per shard in flight: parsing Parquet holds the GIL
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if cfg.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise UserInputError("task_runner.kind 'ray' needs prefect-ray: pip install prefect-ray "
                                 "(or use task_runner.kind 'threads')") from None
        if cfg.address:
            return RayTaskRunner(address=cfg.address)
        return RayTaskRunner(init_kwargs={"num_cpus": cfg.workers, "include_dashboard": False})
    raise UserInputError(f"task_runner.kind {cfg.kind!r}: use threads, dask or ray")


def map_over_shards(stage, shards: list[str], runner: TaskRunnerConfig, name: str, **shared) -> list:
    """``stage(shard, **shared)`` for every shard, run as the subflow ``name`` on ``runner``; results in shard order.

    ``stage`` is a Prefect task defined at module level (cluster workers import it by name); the
    ``shared`` arguments go to every call unchanged. A failed shard fails the subflow, and with it the flow.
    """
    @flow(name=name, task_runner=build_task_runner(runner), validate_parameters=False)
    def sharded_stage(shards: list[str]) -> list:
        futures = stage.map(shards, **{k: unmapped(v) for k, v in shared.items()})
        return [f.result() for f in futures]

    return sharded_stage(list(shards)) if shards else []
