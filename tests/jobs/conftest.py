"""A gateway serving the jobs API (no model needed), and an authenticated client for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import RunningGateway
from tests.jobs.harness import JobsClient, create_client, jobs_settings, token


@pytest.fixture
def jobs_gateway(tmp_path: Path) -> Iterator[RunningGateway]:
    settings = {"jobs": jobs_settings(tmp_path, max_upload_bytes=64 * 1024)}
    running = RunningGateway(settings, tmp_path).start()
    yield running
    running.stop()


@pytest.fixture
def api(jobs_gateway: RunningGateway) -> JobsClient:
    return JobsClient(jobs_gateway, token(jobs_gateway, create_client(jobs_gateway)))
