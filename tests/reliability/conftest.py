"""Reliability fixtures: one real `surge serve` with the tiny model per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import TINY_ARGS
from tests.server.utils import RemoteSurgeServer, remote_server
from tests.tiny_models import make_tiny_model_dir

# The body limit is part of what these tests pin down (413 with OpenAI's body past it).
RELIABILITY_ARGS = [*TINY_ARGS, "--max-body-size", "64KiB"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with the tiny byte-level tokenizer (max_model_len 512)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[RemoteSurgeServer]:
    """The open server (no keys: the caller is `anonymous`, priority 0), 64 KiB body limit."""
    with remote_server(tiny_model_dir, RELIABILITY_ARGS) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: RemoteSurgeServer) -> Iterator[httpx.Client]:
    """A plain HTTP client on the server (raw bytes, no OpenAI client in the way)."""
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def model_name(http: httpx.Client) -> str:
    """The served model's id, as /v1/models gives it."""
    return http.get("/v1/models").json()["data"][0]["id"]
