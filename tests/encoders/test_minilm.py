"""The bundled all-MiniLM-L6-v2 through EncoderClient equals SentenceTransformer.encode."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from surge.encoders import DEFAULT_EMBEDDING_MODEL_NAME, EncoderClient
from tests.encoders.conftest import LoopThread, start_client, stop_client

pytestmark = pytest.mark.timeout(300)

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "How do I reset my password?",
    "Embeddings map text to vectors.",
]
CHINESE = [
    "你好，世界！",
    "机器学习和自然语言处理。",
    "北京是中国的首都。",
]
TEXTS = ENGLISH + CHINESE + ["mixed 中文 and English", "word " * 300]  # the last one truncates


@pytest.fixture(scope="module")
def minilm(loop_thread: LoopThread, minilm_dir: Path) -> Iterator[EncoderClient]:
    client = start_client(loop_thread, minilm_dir, name=DEFAULT_EMBEDDING_MODEL_NAME)
    yield client
    stop_client(loop_thread, client)


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> SentenceTransformer:
    return SentenceTransformer(str(minilm_dir), device="cpu", local_files_only=True)


def test_info(minilm: EncoderClient) -> None:
    assert minilm.info is not None
    assert (minilm.info.name, minilm.info.kind, minilm.info.dim) == (
        "all-MiniLM-L6-v2",
        "embedding",
        384,
    )
    assert minilm.info.max_seq_length == 256 and minilm.info.vocab_size == 30522


def test_batched_and_single_equal_encode(
    minilm: EncoderClient, loop_thread: LoopThread, reference: SentenceTransformer
) -> None:
    expected = reference.encode(TEXTS)
    batched = loop_thread.run(minilm.embed(TEXTS))
    assert np.abs(batched.embeddings - expected).max() < 1e-4
    assert batched.token_counts[-1] == 256

    async def singles() -> list[np.ndarray]:
        results = await asyncio.gather(*(minilm.embed([t]) for t in TEXTS))
        return [r.embeddings[0] for r in results]

    for text, row, ref in zip(TEXTS, loop_thread.run(singles()), expected, strict=True):
        assert np.abs(row - ref).max() < 1e-4, text
        # the model ends in a Normalize module: unit rows without asking
        assert abs(float(np.linalg.norm(row)) - 1.0) < 1e-5


def test_token_ids_equal_text(
    minilm: EncoderClient, loop_thread: LoopThread, reference: SentenceTransformer
) -> None:
    texts = ENGLISH + CHINESE
    ids = [reference.tokenizer(t)["input_ids"] for t in texts]
    from_ids = loop_thread.run(minilm.embed(ids))
    assert np.abs(from_ids.embeddings - reference.encode(texts)).max() < 1e-4
    assert from_ids.num_tokens == sum(len(x) for x in ids)
