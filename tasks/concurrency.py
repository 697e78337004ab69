"""Slots of a concurrency limit shared by every run that calls the same endpoint.

Stage code asks for ``shared_slot(name)`` around each request in flight; without an orchestrator it
is free (nothing else competes). ``flows/`` installs Prefect's global concurrency limits here, so the
same code holds a server-wide slot inside a flow run and none in a plain script or test.
"""

from __future__ import annotations

import contextlib
from typing import AsyncContextManager, Callable

_factory: Callable[[str], AsyncContextManager] | None = None


def install_shared_slot(factory: Callable[[str], AsyncContextManager] | None) -> None:
    """Make ``shared_slot(name)`` return ``factory(name)`` (None: slots are free again)."""
    global _factory
    _factory = factory


def shared_slot(name: str | None) -> AsyncContextManager:
    """An async context manager holding one slot of the limit ``name`` (free when unnamed or uninstalled)."""
    if not name or _factory is None:
        return contextlib.nullcontext()
    return _factory(name)
