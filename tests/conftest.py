"""Shared fixtures: a fake engine for failure paths and a real gateway in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.engine import FakeEngine


@pytest.fixture(scope="session")
def fake_engine() -> Iterator[FakeEngine]:
    engine = FakeEngine().start()
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def closed_port_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    from aiguillage.backends.local_engine import free_port

    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
