"""EncoderClient with tiny random encoders: equal to sentence-transformers, batched, bad input."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import CrossEncoder, SentenceTransformer

from surge.encoders import EncoderClient, EncoderRequestError
from surge.encoders.worker import PROCESS_TITLE
from tests.encoders.conftest import LoopThread, start_client, stop_client
from tests.encoders.tiny_encoders import TINY_MAX_SEQ_LENGTH
from tests.tiny_models import CORPUS

pytestmark = pytest.mark.timeout(180)
logger = logging.getLogger(__name__)

TEXTS = list(dict.fromkeys(CORPUS)) + ["", "机器学习", "hello"]
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 20  # far over 64 tokens


@pytest.fixture(scope="module")
def embedder(loop_thread: LoopThread, tiny_embedding_dir: Path) -> Iterator[EncoderClient]:
    client = start_client(loop_thread, tiny_embedding_dir)
    yield client
    stop_client(loop_thread, client)


@pytest.fixture(scope="module")
def reranker(loop_thread: LoopThread, tiny_reranker_dir: Path) -> Iterator[EncoderClient]:
    client = start_client(loop_thread, tiny_reranker_dir, name="tiny-rerank")
    yield client
    stop_client(loop_thread, client)


@pytest.fixture(scope="module")
def st_embedder(tiny_embedding_dir: Path) -> SentenceTransformer:
    return SentenceTransformer(str(tiny_embedding_dir), device="cpu", local_files_only=True)


def test_info(embedder: EncoderClient, reranker: EncoderClient, tiny_embedding_dir: Path) -> None:
    assert embedder.info is not None and reranker.info is not None
    assert embedder.info.name == tiny_embedding_dir.name and embedder.info.kind == "embedding"
    assert embedder.info.dim == 32 and embedder.info.max_seq_length == TINY_MAX_SEQ_LENGTH
    assert reranker.info.name == "tiny-rerank" and reranker.info.kind == "rerank"
    assert reranker.info.dim is None and reranker.info.vocab_size == embedder.info.vocab_size
    cmdline = Path(f"/proc/{embedder.pid}/cmdline").read_bytes()
    assert PROCESS_TITLE.encode() in cmdline


def test_embed_equals_sentence_transformers(
    embedder: EncoderClient, loop_thread: LoopThread, st_embedder: SentenceTransformer
) -> None:
    expected = st_embedder.encode(TEXTS + [LONG_TEXT])  # encode() truncates to max_seq_length
    batched = loop_thread.run(embedder.embed(TEXTS + [LONG_TEXT]))
    assert batched.embeddings.shape == (len(TEXTS) + 1, 32)
    assert batched.embeddings.dtype == np.float32
    np.testing.assert_allclose(batched.embeddings, expected, atol=1e-4, rtol=0)
    assert batched.token_counts[-1] == TINY_MAX_SEQ_LENGTH
    assert batched.num_tokens == sum(batched.token_counts)
    for text, row in zip(TEXTS[:3], expected, strict=False):
        single = loop_thread.run(embedder.embed([text]))
        np.testing.assert_allclose(single.embeddings[0], row, atol=1e-4, rtol=0)


def test_token_ids_equal_text(
    embedder: EncoderClient, loop_thread: LoopThread, st_embedder: SentenceTransformer
) -> None:
    ids = [st_embedder.tokenizer(t)["input_ids"] for t in TEXTS]
    from_text = loop_thread.run(embedder.embed(TEXTS))
    from_ids = loop_thread.run(embedder.embed(ids))
    np.testing.assert_allclose(from_ids.embeddings, from_text.embeddings, atol=1e-5, rtol=0)
    assert from_ids.token_counts == from_text.token_counts == [len(x) for x in ids]
    counts = loop_thread.run(embedder.count_tokens(TEXTS + [LONG_TEXT]))
    assert counts[:-1] == from_text.token_counts and counts[-1] > TINY_MAX_SEQ_LENGTH


def test_normalize(embedder: EncoderClient, loop_thread: LoopThread) -> None:
    raw = loop_thread.run(embedder.embed(TEXTS[:4])).embeddings
    unit = loop_thread.run(embedder.embed(TEXTS[:4], normalize=True)).embeddings
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, expected, atol=1e-6)


def test_concurrent_single_text_calls_share_model_batches(
    embedder: EncoderClient, loop_thread: LoopThread, st_embedder: SentenceTransformer
) -> None:
    texts = [f"{TEXTS[i % len(TEXTS)]} number {i}" for i in range(64)]
    expected = st_embedder.encode(texts)
    before = embedder.stats.num_batches
    seen_before = len(embedder.stats.recent_batch_sizes)

    async def go() -> list[np.ndarray]:
        results = await asyncio.gather(*(embedder.embed([t]) for t in texts))
        return [r.embeddings[0] for r in results]

    rows = loop_thread.run(go())
    num_batches = embedder.stats.num_batches - before
    sizes = list(embedder.stats.recent_batch_sizes)[seen_before:]
    logger.warning("64 concurrent embed calls ran in %d model batches: %s", num_batches, sizes)
    print(f"64 concurrent embed calls -> {num_batches} model batches of sizes {sizes}")
    assert sum(sizes) == 64
    assert num_batches <= 16
    np.testing.assert_allclose(np.stack(rows), expected, atol=1e-4, rtol=0)
    assert embedder.num_in_flight == 0


def test_bad_token_id_fails_only_that_request(
    embedder: EncoderClient, loop_thread: LoopThread
) -> None:
    vocab_size = embedder.info.vocab_size if embedder.info else 0

    async def go() -> list[object]:
        return await asyncio.gather(
            embedder.embed([[2, 5, 3]]),
            embedder.embed([[2, vocab_size, 3]]),
            embedder.embed([[2, -1, 3]]),
            embedder.embed(["still fine"]),
            return_exceptions=True,
        )

    good, too_big, negative, text = loop_thread.run(go())
    assert isinstance(too_big, EncoderRequestError) and f"token id {vocab_size}" in str(too_big)
    assert isinstance(negative, EncoderRequestError) and "token id -1" in str(negative)
    assert not isinstance(good, BaseException) and not isinstance(text, BaseException)
    assert loop_thread.run(embedder.embed(["after the error"])).embeddings.shape == (1, 32)


def test_too_long_without_truncation_is_a_clear_error(
    embedder: EncoderClient, loop_thread: LoopThread
) -> None:
    length = loop_thread.run(embedder.count_tokens([LONG_TEXT]))[0]
    with pytest.raises(EncoderRequestError, match=rf"input 1 has {length} tokens.* maximum of 64"):
        loop_thread.run(embedder.embed(["short", LONG_TEXT], truncate=False))
    with pytest.raises(EncoderRequestError, match="has 65 tokens"):
        loop_thread.run(embedder.embed([[5] * 65], truncate=False))
    truncated = loop_thread.run(embedder.embed([[5] * 65], truncate=True))
    assert truncated.token_counts == [64]


def test_bad_input_shapes(embedder: EncoderClient, loop_thread: LoopThread) -> None:
    with pytest.raises(EncoderRequestError, match="all strings or all lists"):
        loop_thread.run(embedder.embed(["text", [1, 2]]))  # type: ignore[list-item]
    with pytest.raises(EncoderRequestError, match="empty list of token ids"):
        loop_thread.run(embedder.embed([[]]))
    with pytest.raises(EncoderRequestError, match="cannot be encoded"):
        loop_thread.run(embedder.embed([[2**70]]))
    assert loop_thread.run(embedder.embed([])).embeddings.shape == (0, 32)
    assert embedder.num_in_flight == 0


def test_cancelled_call_leaves_nothing_pending(
    embedder: EncoderClient, loop_thread: LoopThread
) -> None:
    assert embedder.pid is not None
    os.kill(embedder.pid, signal.SIGSTOP)  # the call cannot finish before we cancel it
    try:

        async def go() -> None:
            task = asyncio.create_task(embedder.embed(["never answered"]))
            while embedder.num_in_flight == 0:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        loop_thread.run(go())
        assert embedder.num_in_flight == 0
    finally:
        os.kill(embedder.pid, signal.SIGCONT)
    assert loop_thread.run(embedder.embed(["answered"])).embeddings.shape == (1, 32)
    assert embedder.num_in_flight == 0


def test_rerank_equals_cross_encoder_predict(
    reranker: EncoderClient, loop_thread: LoopThread, tiny_reranker_dir: Path
) -> None:
    query = "what is the capital of France?"
    documents = TEXTS + [LONG_TEXT]
    model = CrossEncoder(str(tiny_reranker_dir), device="cpu", local_files_only=True)
    expected = model.predict([(query, d) for d in documents])
    result = loop_thread.run(reranker.rerank(query, documents))
    np.testing.assert_allclose(result.scores, expected, atol=1e-5, rtol=0)
    assert len(set(np.round(result.scores, 4))) > 1  # the tiny model tells documents apart
    assert result.num_tokens == sum(result.token_counts)
    assert result.token_counts[-1] == TINY_MAX_SEQ_LENGTH
    with pytest.raises(EncoderRequestError, match="query and document"):
        loop_thread.run(reranker.rerank(query, [LONG_TEXT], truncate=False))
    with pytest.raises(EncoderRequestError, match="rerank model, not embedding"):
        loop_thread.run(reranker.embed(["text"]))
    assert loop_thread.run(reranker.rerank(query, [])).scores == []
