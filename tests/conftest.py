"""Test session setup: no outbound calls, a private PREFECT_HOME, one Prefect test server per session."""

import os
import tempfile
from pathlib import Path

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="lmlm-prefect-home-")
os.environ.update(
    PREFECT_HOME=_PREFECT_HOME,
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    GX_ANALYTICS_ENABLED="false",
    DO_NOT_TRACK="1",
    HF_HUB_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
)
os.environ.pop("PREFECT_API_URL", None)

PROJECT = Path(__file__).resolve().parents[1]
REFERENCE = PROJECT.parent / "shared" / "data" / "lmlm-reference"


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server for flow tests (started once per session, on first use)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
