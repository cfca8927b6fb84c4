"""Server fixtures: real `surge serve` processes, one per configuration, shared per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.utils import RemoteSurgeServer, remote_server
from tests.tiny_models import make_tiny_model_dir

TINY_ARGS = ["--threads", "1", "--dtype", "float32"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with the tiny byte-level tokenizer (max_model_len 512)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: Path) -> Iterator[RemoteSurgeServer]:
    """Open (no keys), small body limit, short keep-alive."""
    with remote_server(tiny_model_dir, [*TINY_ARGS, "--max-body-size", "64KiB"]) as server:
        yield server
