"""The one logger helper of tasks: Prefect's run logger inside a flow or task, a module logger elsewhere."""

from __future__ import annotations

import logging


def run_logger(name: str) -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger when called inside a flow or task run, else ``logging.getLogger(name)``."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(name)
