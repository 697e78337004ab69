"""The contract for reporting progress of long work: stage and model code calls :func:`update` as it goes;
whoever runs it listens (the CLI draws progress bars on a terminal, a flow run keeps Prefect progress
artifacts). Nobody listens by default, and an update then costs a function call."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

Listener = Callable[[str, float, "float | None", str], None]  # (what, done, total, unit)
_listeners: list[Listener] = []


def update(what: str, done: float, total: float | None = None, unit: str = "") -> None:
    """``done`` of ``total`` ``unit`` of the work named ``what`` are finished (``total`` None: unknown)."""
    for listener in tuple(_listeners):
        listener(what, done, total, unit)


def listen(listener: Listener) -> None:
    """Send every later :func:`update` to ``listener`` too."""
    if listener not in _listeners:
        _listeners.append(listener)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """:func:`listen` for the duration of the block."""
    listen(listener)
    try:
        yield
    finally:
        if listener in _listeners:
            _listeners.remove(listener)
