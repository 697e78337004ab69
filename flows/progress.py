"""Who listens to ``schemas.progress``: progress bars in the CLI (on a terminal only: quiet in CI, in pipes
and in Prefect's logs), and one Prefect progress artifact per piece of work inside a flow run, so the UI
shows the same numbers."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from typing import Iterator

from schemas import progress

_ARTIFACT_EVERY_S = 2.0  # a progress artifact is updated at most this often (each update is an API call)


def show_bars() -> bool:
    """Bars on an interactive terminal only: not in CI, not when stderr is piped or logged."""
    return sys.stderr.isatty() and not os.environ.get("CI") and os.environ.get("TERM") != "dumb"


@contextlib.contextmanager
def cli_bars() -> Iterator[None]:
    """Progress bars on stderr for every piece of work reported while the block runs (on a terminal)."""
    if not show_bars():
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)  # log lines and prints go above the bars
    tasks: dict[str, int] = {}
    lock = threading.Lock()

    def on_update(what: str, done: float, total: float | None, unit: str) -> None:
        with lock:
            if what not in tasks:
                tasks[what] = bars.add_task(what, total=total, unit=unit)
            bars.update(tasks[what], completed=done, total=total)

    with bars, progress.listening(on_update):
        yield


class RunArtifacts:
    """One Prefect progress artifact per piece of work, in the flow or task run that reports it."""

    def __init__(self) -> None:
        self.ids: dict[tuple[str, str], object] = {}  # (run id, what) -> artifact id
        self.last: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()

    def __call__(self, what: str, done: float, total: float | None, unit: str) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        ctx = TaskRunContext.get() or FlowRunContext.get()
        if ctx is None or not total:
            return
        run = str(getattr(ctx, "task_run", None) and ctx.task_run.id or ctx.flow_run.id)
        key = (run, what)
        now, finished = time.monotonic(), done >= total
        with self.lock:
            if not finished and now - self.last.get(key, -1e9) < _ARTIFACT_EVERY_S:
                return
            self.last[key] = now
            artifact = self.ids.get(key)
        percent = min(100.0, 100.0 * done / total)
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if artifact is None:
            artifact = create_progress_artifact(percent, key=_artifact_key(what),
                                                description=f"{what}: {unit} done of {total:g}")
            with self.lock:
                self.ids[key] = artifact
        else:
            update_progress_artifact(artifact, percent)


def _artifact_key(what: str) -> str:
    """A valid artifact key (lowercase letters, digits, dashes) for a piece of work."""
    return "progress-" + (re.sub(r"[^a-z0-9]+", "-", what.lower()).strip("-") or "work")


_run_artifacts = RunArtifacts()


def attach_run_progress() -> None:
    """Keep progress artifacts in the Prefect run of every piece of work reported from now on; idempotent."""
    progress.listen(_run_artifacts)
