"""Stage code logs to the standard logger ``lmlm`` (``lmlm.tasks.pretrain``, ...); inside a flow or task
run those lines go to Prefect's run log as well, so they show in the UI beside the flow's own."""

from __future__ import annotations

import logging

_attached = False


def attach_stage_logs() -> None:
    """Send the ``lmlm`` logger's records (INFO and up) to the Prefect run they were logged in; idempotent."""
    global _attached
    if _attached:
        return
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        def emit(self, record: logging.LogRecord) -> None:
            if FlowRunContext.get() is not None or TaskRunContext.get() is not None:  # outside a run: console only
                super().emit(record)

    logger = logging.getLogger("lmlm")
    logger.setLevel(logging.INFO)
    logger.addHandler(RunLogHandler())
    _attached = True
