"""Shared UI fixtures: tiny untrained checkpoints (from tests/fixtures_checkpoints.py), one in-process app per session
with small upload limits (so zip bombs stay cheap to build), and a gradio_client connected to it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flaxtumor.uploads import UploadLimits
from tests.fixtures_checkpoints import tiny  # noqa: F401  (the session fixture, shared with the inference tests)

TEST_LIMITS = UploadLimits(
    max_files=30, max_pixels=1024 * 1024, max_total_pixels=16 * 2**20, max_zip_entries=50, max_submission_bytes=4 * 2**20
)


@pytest.fixture(scope="session")
def pipeline(tiny):  # noqa: F811
    from flaxtumor.inference import Pipeline

    return Pipeline.from_checkpoints(tiny.checkpoints)


def serve(pipeline, warm: bool = True) -> Iterator[tuple[str, object]]:
    """(url, demo) of the app on `pipeline` with the test limits, closed when the generator is."""
    from flaxtumor.ui import build_demo, launch, warm_up

    if warm:
        warm_up(pipeline)
    demo = build_demo(pipeline, limits=TEST_LIMITS)
    url = launch(demo, host="127.0.0.1", prevent_thread_lock=True)
    yield url, demo
    demo.blocks.close()


def api_client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


@pytest.fixture(scope="session")
def served(pipeline) -> Iterator[tuple[str, object]]:
    """(url, demo) of the app, launched once for the whole session."""
    yield from serve(pipeline)


@pytest.fixture(scope="session")
def client(served):
    return api_client(served[0])


@pytest.fixture
def files(tmp_path: Path) -> Path:
    return tmp_path
