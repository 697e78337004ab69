"""Prefect global concurrency limits behind ``tasks.concurrency.shared_slot``.

Inside a flow or task run, each endpoint request holds one slot of the named limit on the Prefect
server (``lmlm serve`` creates it with ``llm_slots`` slots). Outside a run there is nothing to share
and no server to ask. A limit missing on the server is noted once per run, not once per request, and
requests then run without it.
"""

from __future__ import annotations

import contextlib
import logging
import threading

log = logging.getLogger("lmlm.flows.concurrency")
_known: dict[tuple[str, str], bool] = {}  # (flow run id, limit) -> exists on the server
_lock = threading.Lock()


def _run_id() -> str | None:
    from prefect.context import FlowRunContext, TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is not None:
        return str(ctx.task_run.flow_run_id or ctx.task_run.id)
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None


async def _limit_exists(limit: str, run: str) -> bool:
    with _lock:
        if (run, limit) in _known:
            return _known[(run, limit)]
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        async with get_client() as client:
            await client.read_global_concurrency_limit_by_name(limit)
        exists = True
    except ObjectNotFound:
        exists = False
    with _lock:
        if (run, limit) not in _known and not exists:
            log.warning("global concurrency limit %r does not exist on the Prefect server: endpoint requests of "
                        "this run are not limited across runs (`lmlm serve` creates it)", limit)
        _known[(run, limit)] = exists
    return exists


@contextlib.asynccontextmanager
async def global_slot(limit: str | None):
    """One slot of the Prefect global concurrency limit ``limit`` while the body runs (see module doc)."""
    run = _run_id() if limit else None
    if run is None or not await _limit_exists(limit, run):
        yield
        return
    from prefect.concurrency.asyncio import concurrency

    async with concurrency(limit, occupy=1, strict=False):
        yield
