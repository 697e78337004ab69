"""Flows of lmlm-pipeline: every Prefect declaration, the runners, the CLI (docs/architecture.md).

Importing any of them installs Prefect's global concurrency limits as the shared endpoint slots of
the stage code below (``tasks.concurrency``); Prefect itself is imported only when a slot is taken.
"""

from tasks.concurrency import install_shared_slot


def _prefect_slot(limit: str):
    from flows.concurrency import global_slot

    return global_slot(limit)


install_shared_slot(_prefect_slot)
