"""An embedding model over remote encoder hosts (what Ray Serve runs), with the transport faked
in process: each call lands on one of two hosts, which answers or fails the way a Serve handle
does (the replica's own error wrapped in a RayTaskError; a dead replica as an actor error).
The client must keep EncoderClient's meaning: bad input is a 400, an unreachable host a 503."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from surge.config import EngineConfig, ServerConfig
from surge.encoders import (
    EmbedResult,
    EncoderDeadError,
    EncoderInfo,
    EncoderRequestError,
    RerankResult,
)
from surge.router import ModelHandle, ModelKind, ModelSpec, Starter
from surge.server.app import create_app
from surge.server.models import ServedModels, StarterConfig
from surge.serving.remote_encoder import EncoderReply, RemoteEncoderClient

pytestmark = pytest.mark.timeout(60)

INFO = EncoderInfo("emb", "embedding", dim=3, max_seq_length=8, vocab_size=100)
TOO_LONG = "a text longer than the model takes"


class RayTaskError(Exception):
    """As Ray raises what a replica raised: the original is `cause`, and (as_instanceof_cause)
    the error is also an instance of the original's class, with Ray's traceback as its text."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            f"ray::EncoderHost.embed()\nTraceback (most recent call last): ...\n{cause}"
        )
        self.cause = cause


def ray_task_error(cause: BaseException) -> RayTaskError:
    cls = type(f"RayTaskError({type(cause).__name__})", (RayTaskError, type(cause)), {})
    return cls(cause)  # type: ignore[no-any-return]


class ActorDiedError(Exception):
    """As Ray raises for a call on a replica (actor) that died: no `cause` exception."""


def vector(text: str) -> list[float]:
    return [float(len(text)), float(ord(text[0])), 1.0]


class FakeHosts:
    """RemoteEncoders as a Serve handle behaves, over two hosts taking calls in turn; each host
    counts the batches (one per call) and rows it ran. `dead` makes every call fail as if the
    host had died (an actor error, or the host's own worker gone: a wrapped EncoderDeadError)."""

    def __init__(self) -> None:
        self.counts = {"host-a": [0, 0], "host-b": [0, 0]}
        self._turns = itertools.cycle(self.counts)
        self.dead: Exception | None = None
        self.started = asyncio.Event()  # a call has reached a host
        self.hold: asyncio.Event | None = None  # set: calls wait on it

    async def info(self) -> EncoderInfo:
        if self.dead is not None:
            raise self.dead
        return INFO

    async def embed(
        self, inputs: list[str] | list[list[int]], truncate: bool, normalize: bool
    ) -> EncoderReply[EmbedResult]:
        texts = [str(x) for x in inputs]
        if not truncate and TOO_LONG in texts:
            raise ray_task_error(EncoderRequestError("input 0 is 9 tokens, over the model's 8"))
        rows = np.array([vector(t) for t in texts], dtype=np.float32)
        return await self._answer(EmbedResult(rows, 2 * len(texts), [2] * len(texts)), len(texts))

    async def rerank(
        self, query: str, documents: list[str], truncate: bool
    ) -> EncoderReply[RerankResult]:
        scores = [float(len(d)) for d in documents]
        return await self._answer(RerankResult(scores, len(documents)), len(documents))

    async def count_tokens(self, texts: list[str]) -> EncoderReply[list[int]]:
        return await self._answer([len(t) for t in texts], 0)

    async def _answer(self, result: object, rows: int) -> EncoderReply:  # type: ignore[type-arg]
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.dead is not None:
            raise self.dead
        host = next(self._turns)
        self.counts[host][0] += 1
        self.counts[host][1] += rows
        return EncoderReply(host, result, *self.counts[host])


async def started_client() -> tuple[FakeHosts, RemoteEncoderClient]:
    hosts = FakeHosts()
    return hosts, await RemoteEncoderClient.start(hosts)


def test_calls_return_the_hosts_results_and_stats_sum_over_hosts() -> None:
    async def body() -> None:
        hosts, client = await started_client()
        assert client.info == INFO and client.is_alive()
        result = await client.embed(["hello", "a"])
        assert result.embeddings.tolist() == [vector("hello"), vector("a")]
        assert result.num_tokens == 4
        assert (await client.rerank("q", ["xx", "x"])).scores == [2.0, 1.0]
        assert await client.count_tokens(["abc"]) == [3]
        await client.embed(["b"])
        # two hosts answered in turn; the model's counts are theirs added up
        assert client.stats.num_batches == 4
        assert client.stats.num_rows == 2 + 2 + 0 + 1
        assert hosts.counts == {"host-a": [2, 2], "host-b": [2, 3]}

    asyncio.run(body())


def test_a_late_reply_never_lowers_a_hosts_counts() -> None:
    async def body() -> None:
        hosts, client = await started_client()
        late = EncoderReply("host-a", [1], 1, 1)
        hosts.counts["host-a"] = [5, 9]
        await client.count_tokens(["x"])  # host-a: 6 batches, 9 rows
        hosts.count_tokens = lambda texts: _done(late)  # type: ignore[method-assign]
        await client.count_tokens(["x"])
        assert (client.stats.num_batches, client.stats.num_rows) == (6, 9)

    asyncio.run(body())


async def _done(reply: EncoderReply[list[int]]) -> EncoderReply[list[int]]:
    return reply


def test_in_flight_counts_calls_until_they_return() -> None:
    async def body() -> None:
        hosts, client = await started_client()
        hosts.hold = asyncio.Event()
        call = asyncio.create_task(client.embed(["x"]))
        await hosts.started.wait()
        assert client.num_in_flight == 1
        hosts.hold.set()
        await call
        assert client.num_in_flight == 0

    asyncio.run(body())


def test_the_replicas_request_error_is_a_request_error_with_its_own_message() -> None:
    async def body() -> None:
        _, client = await started_client()
        with pytest.raises(EncoderRequestError) as caught:
            await client.embed([TOO_LONG], truncate=False)
        assert type(caught.value) is EncoderRequestError  # not Ray's wrapper
        assert str(caught.value) == "input 0 is 9 tokens, over the model's 8"
        assert client.is_alive() and client.num_in_flight == 0

    asyncio.run(body())


@pytest.mark.parametrize(
    "death",
    [
        ActorDiedError("The actor died unexpectedly before finishing this task."),
        ray_task_error(EncoderDeadError("encoder worker 123 (emb) exited with code -9")),
        ray_task_error(RuntimeError("a bug in the replica")),
    ],
    ids=["actor-died", "worker-died", "replica-raised"],
)
def test_a_dead_replica_is_a_dead_encoder(death: Exception) -> None:
    async def body() -> None:
        hosts, client = await started_client()
        hosts.dead = death
        with pytest.raises(EncoderDeadError) as caught:
            await client.embed(["x"])
        assert type(caught.value) is EncoderDeadError
        if isinstance(death, RayTaskError) and isinstance(death.cause, EncoderDeadError):
            assert str(caught.value) == str(death.cause)
        # the other replicas may still serve: the client stays, the registry decides
        assert client.is_alive()
        hosts.dead = None
        assert (await client.embed(["x"])).embeddings.shape == (1, 3)

    asyncio.run(body())


def test_no_host_at_start_is_a_dead_encoder_and_close_refuses_calls() -> None:
    async def body() -> None:
        hosts = FakeHosts()
        hosts.dead = ActorDiedError("no replica")
        with pytest.raises(EncoderDeadError):
            await RemoteEncoderClient.start(hosts)
        hosts.dead = None
        client = await RemoteEncoderClient.start(hosts)
        await client.close()
        assert not client.is_alive()
        with pytest.raises(EncoderDeadError):
            await client.embed(["x"])

    asyncio.run(body())


def test_rays_own_exceptions_map_the_same_way() -> None:
    """Ray's real exception types (no cluster needed): the wrapped request error and a dead
    actor, as a Serve handle's awaited response raises them."""
    exceptions = pytest.importorskip("ray.exceptions", reason="Ray (the surge[ray] extra)")

    async def body() -> None:
        hosts, client = await started_client()
        cause = EncoderRequestError("input 0 is 9 tokens, over the model's 8")
        hosts.dead = exceptions.RayTaskError("embed", "Traceback: ...", cause).as_instanceof_cause()
        with pytest.raises(EncoderRequestError) as bad:
            await client.embed(["x"])
        assert type(bad.value) is EncoderRequestError and str(bad.value) == str(cause)
        hosts.dead = exceptions.ActorDiedError()
        with pytest.raises(EncoderDeadError):
            await client.embed(["x"])

    asyncio.run(body())


# ---- through the server's routes ---------------------------------------------------------------


def app_over(hosts: FakeHosts, tmp_path: Path) -> TestClient:
    """`surge serve`'s app whose one embedding model is a RemoteEncoderClient over `hosts`."""
    (tmp_path / "model.safetensors").write_bytes(b"0" * 64)  # what the memory estimate reads
    spec = ModelSpec("emb", str(tmp_path), ModelKind.EMBEDDING, keep_alive=None, pinned=True)

    def starter_factory(_: StarterConfig) -> Starter:
        async def start(spec: ModelSpec) -> ModelHandle:
            return await RemoteEncoderClient.start(hosts)

        return start

    app = create_app(
        EngineConfig(),
        ServerConfig(),
        ServedModels((spec,), ("emb",)),
        starter_factory=starter_factory,
    )
    return TestClient(app, base_url="http://127.0.0.1")


def test_the_api_answers_as_with_a_local_encoder(tmp_path: Path) -> None:
    hosts = FakeHosts()
    with app_over(hosts, tmp_path) as http:
        for _ in range(100):
            if http.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        ok = http.post("/v1/embeddings", json={"model": "emb", "input": ["hello", "a"]})
        assert ok.status_code == 200, ok.text
        assert [d["embedding"] for d in ok.json()["data"]] == [vector("hello"), vector("a")]
        assert ok.json()["usage"] == {"prompt_tokens": 4, "total_tokens": 4}

        bad = http.post(
            "/v1/embeddings", json={"model": "emb", "input": [TOO_LONG], "truncate": False}
        )
        assert bad.status_code == 400
        error = bad.json()["error"]
        assert error["message"] == "input 0 is 9 tokens, over the model's 8"
        assert error["param"] == "input" and error["type"] == "invalid_request_error"

        http.post("/v1/embeddings", json={"model": "emb", "input": ["b"]})
        metrics = http.get("/metrics").text
        assert 'surge:encoder_batches_total{model="emb"} 2.0' in metrics
        assert 'surge:encoder_rows_total{model="emb"} 3.0' in metrics

        hosts.dead = ActorDiedError("The actor died unexpectedly before finishing this task.")
        dead = http.post("/v1/embeddings", json={"model": "emb", "input": ["x"]})
        assert dead.status_code == 503
        assert dead.json()["error"]["code"] == "worker_dead"
