"""Dynamic batching without a model: the pure planners, and EncoderWorker over a fake runner."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from surge.encoders.batching import WINDOW_BATCHES, plan_batches, window_size
from surge.encoders.config import EncoderConfig, EncoderInfo
from surge.encoders.messages import (
    AbortRequest,
    CountTokensRequest,
    EncodeRequest,
    EncoderOutput,
    EncoderResult,
    RerankRequest,
)
from surge.encoders.runner import EncoderInputError, Features
from surge.encoders.worker import EncoderWorker

POISON = 666  # a token id the fake model raises on, as a real one does on an out-of-range id


def test_plan_batches_keeps_padded_size_in_budget() -> None:
    lengths = [5, 30, 7, 30, 2, 8, 64, 3, 3, 40]
    batches = plan_batches(lengths, max_batch_tokens=64, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) * max(lengths[i] for i in batch) <= 64
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    assert batches[0] == [6]  # 64 tokens fill the budget alone


def test_plan_batches_runs_an_oversized_row_alone() -> None:
    assert plan_batches([100, 1, 1], max_batch_tokens=10, max_batch_size=8) == [[0], [1, 2]]
    assert plan_batches([], max_batch_tokens=10, max_batch_size=8) == []


def test_window_is_a_fifo_prefix_of_a_few_budgets() -> None:
    assert window_size([], 10, 4) == 0
    assert window_size([1000], 10, 4) == 1  # never empty
    assert window_size([10] * 100, 10, 100) == WINDOW_BATCHES
    assert window_size([1] * 100, 1000, 2) == 2 * WINDOW_BATCHES
    assert window_size(iter([3, 3, 3]), 1000, 100) == 3  # reads an iterator lazily


@dataclass
class FakeRunner:
    """Rows are token ids; a row's embedding is [sum of ids, number of ids]."""

    kind: str = "embedding"
    batches: list[list[int]] = field(default_factory=list)  # lengths of each batch run
    info: EncoderInfo = field(
        default_factory=lambda: EncoderInfo(
            "fake", "embedding", 2, max_seq_length=8, vocab_size=1000
        )
    )

    def tokenize(self, msg: EncodeRequest | RerankRequest) -> list[Features]:
        assert isinstance(msg, EncodeRequest) and msg.token_ids is not None
        if any(len(ids) > 8 for ids in msg.token_ids):
            raise EncoderInputError("too long")
        if [-7] in msg.token_ids:
            raise RuntimeError("tokenizer bug")
        return [{"input_ids": ids} for ids in msg.token_ids]

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def run(self, rows: list[Features]) -> np.ndarray:
        if any(POISON in row["input_ids"] for row in rows):
            raise IndexError("index out of range in self")
        self.batches.append([len(row["input_ids"]) for row in rows])
        return np.array([[sum(r["input_ids"]), len(r["input_ids"])] for r in rows], np.float32)


def make_worker(**config: int) -> tuple[EncoderWorker, FakeRunner, list[EncoderResult]]:
    runner = FakeRunner()
    sent: list[EncoderResult] = []

    def send(out: EncoderOutput) -> None:
        assert isinstance(out, EncoderResult)
        sent.append(out)

    worker = EncoderWorker(runner, EncoderConfig("fake", **config), send)  # type: ignore[arg-type]
    return worker, runner, sent


def drain(worker: EncoderWorker) -> None:
    while worker.has_work():
        worker.step()


def rows_of(result: EncoderResult) -> np.ndarray:
    return np.frombuffer(result.embeddings, np.float32).reshape(result.shape)


def test_requests_share_batches_and_get_their_own_rows() -> None:
    worker, runner, sent = make_worker(max_batch_tokens=16, max_batch_size=4)
    requests = {
        "a": [[1, 2, 3], [4]],
        "b": [[5] * 8, [6, 6], [7]],
        "c": [[8] * 4],
    }
    for req_id, ids in requests.items():
        worker.handle(EncodeRequest(req_id, token_ids=ids))
    drain(worker)
    for batch in runner.batches:
        assert len(batch) <= 4 and len(batch) * max(batch) <= 16
    assert len(runner.batches) < sum(len(ids) for ids in requests.values())
    by_id = {r.req_id: r for r in sent}
    assert sorted(by_id) == ["a", "b", "c"] and len(sent) == 3
    for req_id, ids in requests.items():
        result = by_id[req_id]
        assert result.error is None
        expected = [[sum(x), len(x)] for x in ids]
        np.testing.assert_array_equal(rows_of(result), np.array(expected, np.float32))
        assert result.token_counts == [len(x) for x in ids]
        assert result.num_tokens == sum(len(x) for x in ids)
        assert result.batch_sizes and all(1 <= s <= 4 for s in result.batch_sizes)
    # every batch is reported to the client exactly once, in some reply
    reported = [s for r in sent for s in r.worker_batch_sizes]
    assert sorted(reported) == sorted(len(b) for b in runner.batches)


def test_a_row_the_model_rejects_fails_only_its_request() -> None:
    worker, runner, sent = make_worker()
    worker.handle(EncodeRequest("good-1", token_ids=[[1, 2], [3]]))
    worker.handle(EncodeRequest("bad", token_ids=[[4], [5, POISON]]))
    worker.handle(EncodeRequest("good-2", token_ids=[[6]]))
    drain(worker)
    by_id = {r.req_id: r for r in sent}
    assert "index out of range" in (by_id["bad"].error or "")
    assert by_id["good-1"].error is None and by_id["good-2"].error is None
    np.testing.assert_array_equal(rows_of(by_id["good-1"]), [[3, 2], [3, 1]])
    worker.handle(EncodeRequest("after", token_ids=[[9]]))
    drain(worker)
    assert sent[-1].req_id == "after" and sent[-1].error is None
    assert not worker.requests


def test_input_errors_and_wrong_kind_answer_at_once() -> None:
    worker, _, sent = make_worker()
    worker.handle(EncodeRequest("long", token_ids=[[1] * 9]))
    worker.handle(RerankRequest("rerank", "q", ["d"]))
    worker.handle(EncodeRequest("neither"))
    worker.handle(EncodeRequest("empty", token_ids=[]))
    worker.handle(EncodeRequest("crash", token_ids=[[-7]]))
    worker.handle(CountTokensRequest("count", ["a b c", "d"]))
    assert not worker.has_work()
    by_id = {r.req_id: r for r in sent}
    assert by_id["long"].error == "too long"
    assert "embedding model, not rerank" in (by_id["rerank"].error or "")
    assert "exactly one" in (by_id["neither"].error or "")
    assert by_id["empty"].error is None and by_id["empty"].shape == (0, 2)
    assert by_id["count"].token_counts == [3, 1]
    assert by_id["crash"].error == "could not tokenize: tokenizer bug"


def test_aborted_rows_never_run() -> None:
    worker, runner, sent = make_worker()
    worker.handle(EncodeRequest("gone", token_ids=[[1], [2]]))
    worker.handle(EncodeRequest("kept", token_ids=[[3]]))
    worker.handle(AbortRequest(["gone", "unknown"]))
    drain(worker)
    assert [r.req_id for r in sent] == ["kept"]
    assert runner.batches == [[1]]


@pytest.mark.parametrize("normalize", [False, True])
def test_normalize_rows(normalize: bool) -> None:
    worker, _, sent = make_worker()
    worker.handle(EncodeRequest("n", token_ids=[[3, 1]], normalize=normalize))
    drain(worker)
    expected = np.array([[4, 2]], np.float32)
    if normalize:
        expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(rows_of(sent[0]), expected, rtol=1e-6)
