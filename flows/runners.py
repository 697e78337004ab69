"""Every way a step runs: where a flow's stages go, decided in one place.

- :func:`map_over_shards`: a per-shard Prefect task over many shards, as a subflow on the task runner a
  flow's config names (:func:`build_task_runner`: threads, a Dask cluster, a Ray cluster).
- :func:`process_pool`: jobs spread over local worker processes that call back into the parent (the
  ingest stage's shared deduplication).
- :func:`run_module`: one step as ``python -m module`` in a process of its own, with its own thread
  count, or under ``torchrun`` across GPUs (:func:`torchrun_command`).

Stage code in ``tasks/`` never starts a process, pool or cluster itself: it takes a runner argument
where it can be spread, and runs in the calling process otherwise. Dask and Ray are optional installs:
choosing one that is not installed is one clear error naming the package.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import traceback
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

from schemas.configs import TaskRunnerConfig
from schemas.errors import ERROR_FILE_ENV, UserInputError

PROJECT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- Prefect task runners


def build_task_runner(cfg: TaskRunnerConfig):
    """The Prefect task runner ``cfg`` describes; a local cluster of ``cfg.workers`` workers unless ``cfg.address``."""
    from prefect.task_runners import ThreadPoolTaskRunner

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


def map_over_shards(stage, shards: list[str], runner: TaskRunnerConfig, name: str,
                    on_result: Callable[[Any, int], None] | None = None, **shared) -> list:
    """``stage(shard, **shared)`` for every shard, run as the subflow ``name`` on ``runner``; results in shard order.

    ``stage`` is a Prefect task defined at module level (cluster workers import it by name); the
    ``shared`` arguments go to every call unchanged. ``on_result(result, done)`` is called in this
    process as each shard finishes (``done`` of ``len(shards)``), e.g. for a progress artifact. A failed
    shard fails the subflow, and with it the flow.
    """
    from prefect import flow, unmapped
    from prefect.futures import as_completed

    @flow(name=name, task_runner=build_task_runner(runner), validate_parameters=False)
    def sharded_stage(shards: list[str]) -> list:
        futures = stage.map(shards, **{k: unmapped(v) for k, v in shared.items()})
        if on_result is not None:
            for done, future in enumerate(as_completed(futures), 1):
                on_result(future.result(), done)
        return [f.result() for f in futures]

    return sharded_stage(list(shards)) if shards else []


# ----------------------------------------------------------------------------- local worker processes


def process_pool(workers: int):
    """A job runner for stage code that spreads jobs over local processes (``tasks.ingest.JobRunner``):
    ``runner(work, jobs, on_done=..., callbacks=..., **shared)`` runs ``work(job, **shared, **callbacks)``
    in ``workers`` processes and ``on_done(result)`` here, in job completion order. Each callback runs in
    this process: workers call it through a pipe (so, e.g., one deduplication index serves them all).
    With one worker or one job everything runs in this process."""

    def run(work: Callable, jobs: list, *, on_done: Callable, callbacks: dict[str, Callable] | None = None,
            **shared) -> None:
        callbacks = callbacks or {}
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                on_done(work(job, **shared, **callbacks))
            return
        _run_in_processes(work, jobs, workers, on_done, callbacks, shared)

    return run


def _worker(conn, work: Callable, shared: dict, names: list[str]) -> None:
    """A worker process: runs the jobs it is sent; callbacks go to the parent through ``conn``."""

    def proxy(name: str) -> Callable:
        def call(*args):
            conn.send(("call", name, args))
            return conn.recv()

        return call

    callbacks = {name: proxy(name) for name in names}
    while (job := conn.recv()) is not None:
        try:
            conn.send(("done", work(job, **shared, **callbacks)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            return


def _run_in_processes(work, jobs, workers, on_done, callbacks, shared) -> None:
    # fork starts a worker in milliseconds but is unsafe beside other threads (Prefect's): spawn then
    alone = threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if alone else "spawn")
    if alone:
        import pyarrow as pa

        pa.array([""])  # pyarrow imports pandas on first use: once here rather than in every forked worker
    pending = list(jobs)
    procs: dict = {}  # connection -> process
    finished = False
    try:
        for _ in range(min(workers, len(jobs))):
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, work, shared, list(callbacks)), daemon=True)
            proc.start()
            child.close()
            procs[conn] = proc
            conn.send(pending.pop(0))
        busy = set(procs)
        while busy:
            for conn in wait(list(busy)):
                try:
                    msg = conn.recv()
                except EOFError:
                    raise RuntimeError(f"worker process died (exit code {procs[conn].exitcode})") from None
                if msg[0] == "call":
                    conn.send(callbacks[msg[1]](*msg[2]))
                elif msg[0] == "done":
                    on_done(msg[1])
                    if pending:
                        conn.send(pending.pop(0))
                    else:
                        conn.send(None)
                        busy.discard(conn)
                else:
                    raise RuntimeError(f"worker process failed:\n{msg[1]}")
        finished = True
    finally:
        for proc in procs.values():
            proc.join(10 if finished else 0)
            if proc.is_alive():
                proc.terminate()


# ----------------------------------------------------------------------------- a step in a process of its own


def torchrun_command(module: str, args: list[str], gpus: int) -> list[str]:
    """The command running ``python -m module args`` under torchrun on ``gpus`` local GPUs."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", module, *args]


def run_module(module: str, args: list[str], *, log_path: str, threads: int | None = None, gpus: int = 0,
               on_line: Callable[[str], None] | None = None) -> None:
    """``python -m module args`` in a process of its own (under torchrun when ``gpus`` > 1), with
    ``threads`` CPU threads; every output line goes to ``log_path`` (readable with tail -f) and to
    ``on_line``. A user error the step reports (``schemas.errors.report_to_launcher``) is raised here as one UserInputError line; any other failure as a
    RuntimeError with the last lines of the log."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    error_file = os.path.abspath(log_path) + ".error"
    if os.path.exists(error_file):
        os.remove(error_file)
    # the project importable from any working directory; relative paths stay relative to the caller's
    env = {**os.environ, ERROR_FILE_ENV: error_file,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = torchrun_command(module, args, gpus) if gpus > 1 else [sys.executable, "-m", module, *args]
    lines: list[str] = []
    with open(log_path, "a") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                                      text=True, errors="replace") as proc:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            lines.append(line.rstrip("\n"))
            if on_line is not None:
                on_line(lines[-1])
    if proc.returncode != 0:
        if os.path.exists(error_file):
            raise UserInputError(json.loads(Path(error_file).read_text())["error"])
        raise RuntimeError(f"{module} failed (exit {proc.returncode}); last lines of {log_path}:\n"
                           + "\n".join(lines[-20:]))

