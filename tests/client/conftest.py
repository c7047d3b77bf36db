"""Live `openemploi serve` processes for the client's tests: real subprocesses, as a caller of the client meets them.

Each server owns a copy of the catalogues indexed once per session (`catalogue_copy` in
tests/conftest.py). Collections the tests create carry fresh names and are dropped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from openemploi.client import Client
from openemploi.testing.launcher import ServerProcess

FIRST_START_TIMEOUT_S = 3600.0  # a first start indexes the catalogues: minutes, more on a busy CPU


def _serve(collections_dir: Path, skills: bool) -> ServerProcess:
    return ServerProcess(
        collections_dir,
        env={"OPENEMPLOI_ROME_COLLECTION": "true", "OPENEMPLOI_SKILLS_COLLECTION": str(skills).lower()},
        ready_timeout_s=FIRST_START_TIMEOUT_S,
    )


@pytest.fixture(scope="session")
def live_server(default_version, catalogue_copy):
    """The ROME catalogue without the ESCO skills: embedding, matching, collections."""
    server = _serve(catalogue_copy(), skills=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def skills_server(default_version, catalogue_copy):
    """The ROME catalogue and the ESCO skills: the SkillsService."""
    server = _serve(catalogue_copy(), skills=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(live_server):
    with Client(live_server.address) as client:
        yield client
