"""A front end over remote engine hosts (what Ray Serve runs), with the transport faked in
process: each host is a CoreHost over a scripted core, so every failure can be placed exactly.
Streams must go on, token for token, when the host running them dies or its core does."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from surge.config import EngineConfig, ReplicaConfig
from surge.engine.async_engine import AsyncEngine
from surge.server.metrics import Metrics
from surge.serving.core_host import CoreHost
from surge.serving.remote_client import RemoteCoreClient
from surge.serving.wire import HostChunk, decode_request, encode, encode_limits
from surge.tokenizer import Tokenizer
from tests.engine.test_failover import PARAMS, SUP, ScriptedCore, collect, expected, prompts
from tests.tiny_models import make_tokenizer

pytestmark = pytest.mark.timeout(60)


def sync(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body on a fresh event loop (the suite uses no asyncio plugin)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


class HostDied(RuntimeError):
    """What the transport raises when the host (the actor) running a stream is gone."""


class FakeStream:
    """One sequence's stream from one host, as Ray's response generator behaves."""

    def __init__(self, hosts: FakeHosts, host: CoreHost, data: bytes) -> None:
        self._hosts, self.host = hosts, host
        self._gen = host.stream(decode_request(data))
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        died = asyncio.ensure_future(self._hosts.died[self.host.host_id].wait())
        step: asyncio.Future[object] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(self._gen))
                await asyncio.wait({step, died}, return_when=asyncio.FIRST_COMPLETED)
                if died.done():
                    raise HostDied(f"actor {self.host.host_id} died")
                try:
                    outputs = step.result()
                except StopAsyncIteration:
                    return
                yield encode(HostChunk(self.host.host_id, outputs))
        finally:
            # a cancelled call is cancelled in the host too (as Ray Serve propagates it)
            died.cancel()
            if step is not None:
                step.cancel()

    def cancel(self) -> None:
        self.cancelled = True


class FakeHosts:
    """A deployment of CoreHosts; new streams go round robin over the live ones."""

    def __init__(self, num_hosts: int) -> None:
        self.cores: dict[str, list[ScriptedCore]] = {}
        self.hosts = [self._host(f"h{i}") for i in range(num_hosts)]
        self.dead: set[str] = set()
        self.died = {h.host_id: asyncio.Event() for h in self.hosts}
        self.streams: list[FakeStream] = []
        self._rr = itertools.count()

    def _host(self, host_id: str) -> CoreHost:
        def factory(config: EngineConfig) -> ScriptedCore:
            core = ScriptedCore(len(self.cores.setdefault(host_id, [])))
            self.cores[host_id].append(core)
            return core

        return CoreHost(EngineConfig(), SUP, factory, host_id=host_id)

    async def start(self) -> None:
        for host in self.hosts:
            await host.start()

    async def limits(self) -> bytes:
        return encode_limits(self.hosts[0].limits)

    def stream(self, request: bytes) -> FakeStream:
        live = [h for h in self.hosts if h.host_id not in self.dead]
        stream = FakeStream(self, live[next(self._rr) % len(live)], request)
        self.streams.append(stream)
        return stream

    def kill_host(self, host_id: str) -> None:
        """The host's actor is gone: its streams break, new ones go elsewhere."""
        self.dead.add(host_id)
        self.died[host_id].set()

    def core(self, host_id: str) -> ScriptedCore:
        return self.cores[host_id][-1]

    async def step(self) -> None:
        for host in self.hosts:
            core = self.cores[host.host_id][-1]
            if host.host_id not in self.dead and not core.dead:
                core.step()
        for _ in range(5):
            await asyncio.sleep(0)


async def front_end(hosts: FakeHosts) -> AsyncEngine:
    engine = AsyncEngine(
        EngineConfig(),
        Tokenizer(make_tokenizer(), (2,)),
        False,
        SUP,
        client_factory=lambda config: RemoteCoreClient(hosts),
        replicas=ReplicaConfig(hosts=len(hosts.hosts)),
    )
    await engine.start()
    return engine


Collected = asyncio.Task[tuple[list[int], str | None, int]]


async def run_until_done(hosts: FakeHosts, tasks: list[Collected]) -> None:
    for _ in range(2000):
        if all(t.done() for t in tasks):
            return
        await hosts.step()
        await asyncio.sleep(0.001)
    raise AssertionError("streams never ended")


@sync
async def test_streams_run_on_every_host_and_match_the_model() -> None:
    hosts = FakeHosts(2)
    await hosts.start()
    engine = await front_end(hosts)
    tasks = [asyncio.create_task(collect(engine, f"r{i}", p)) for i, p in enumerate(prompts(4))]
    await run_until_done(hosts, tasks)
    for task, prompt in zip(tasks, prompts(4), strict=True):
        tokens, error, _ = task.result()
        assert error is None and tokens == expected(prompt, PARAMS.max_tokens)
    assert {len(c.received) for cores in hosts.cores.values() for c in cores} == {2}
    assert engine.num_failovers == 0
    assert engine.max_num_seqs == EngineConfig().max_num_seqs * 2  # both hosts' slots
    await engine.shutdown()


@pytest.mark.parametrize("failure", ["host", "core"])
@sync
async def test_a_dead_hosts_streams_go_on_elsewhere_token_for_token(failure: str) -> None:
    hosts = FakeHosts(2)
    await hosts.start()
    engine = await front_end(hosts)
    tasks = [asyncio.create_task(collect(engine, f"r{i}", p)) for i, p in enumerate(prompts(4))]
    for _ in range(4):  # a few tokens each, then h0 goes
        await hosts.step()
    if failure == "host":
        hosts.kill_host("h0")  # the actor is gone: its streams break in the transport
    else:
        hosts.core("h0").kill()  # its core died: the host says its sequences are lost
    await run_until_done(hosts, tasks)
    for task, prompt in zip(tasks, prompts(4), strict=True):
        tokens, error, _ = task.result()
        assert error is None and tokens == expected(prompt, PARAMS.max_tokens)
    assert engine.num_failovers == 2
    # resent with what they had produced (to h1, or to h0's restarted core)
    received = [r for cores in hosts.cores.values() for core in cores for r in core.received]
    resent = [r for r in received if r.output_token_ids]
    assert len(resent) == 2 and all(len(r.output_token_ids) >= 3 for r in resent)
    await engine.shutdown()


@sync
async def test_closing_a_stream_aborts_it_on_its_host() -> None:
    hosts = FakeHosts(1)
    await hosts.start()
    engine = await front_end(hosts)
    agen = engine.generate("r0", prompts(1)[0], PARAMS)
    first_output = asyncio.ensure_future(anext(agen))
    while not first_output.done():
        await hosts.step()
    first = first_output.result()
    assert first.outputs[0].delta_token_ids
    await agen.aclose()  # the client went away
    for _ in range(20):
        await asyncio.sleep(0)
    assert hosts.streams[0].cancelled
    assert hosts.core("h0").seqs == {}  # aborted in the core
    assert hosts.hosts[0].work() == 0
    await engine.shutdown()


@sync
async def test_a_host_that_stops_answering_loses_its_sequences_to_the_others() -> None:
    hosts = FakeHosts(2)
    await hosts.start()
    engine = await front_end(hosts)
    tasks = [asyncio.create_task(collect(engine, f"r{i}", p)) for i, p in enumerate(prompts(2))]
    await hosts.step()
    hosts.dead.add("h0")  # new streams avoid it...
    client = engine.replicas[0]._client
    assert isinstance(client, RemoteCoreClient)
    client.kill()  # ...and the stall watchdog gives up on what it held
    await run_until_done(hosts, tasks)
    for task, prompt in zip(tasks, prompts(2), strict=True):
        tokens, error, _ = task.result()
        assert error is None and tokens == expected(prompt, PARAMS.max_tokens)
    assert engine.is_ready and engine.num_restarts == 0  # the front end never saw a dead core
    await engine.shutdown()


@sync
async def test_load_is_the_live_hosts_reports_summed() -> None:
    hosts = FakeHosts(2)
    await hosts.start()
    engine = await front_end(hosts)
    tasks = [asyncio.create_task(collect(engine, f"r{i}", p)) for i, p in enumerate(prompts(4))]
    client = engine.replicas[0]._client
    assert isinstance(client, RemoteCoreClient)
    while len(client.host_stats()) < 2:
        await hosts.step()
    per_host = client.host_stats()
    assert set(per_host) == {"h0", "h1"}
    assert sum(s.num_running for s in per_host.values()) == engine.stats.num_running == 4
    assert [h.work() for h in hosts.hosts] == [2, 2]
    rows = {
        sample.labels["replica"]: sample.value
        for family in Metrics(lambda: {"m": engine}).registry.collect()
        if family.name == "surge:num_requests_running"
        for sample in family.samples
    }
    assert rows == {"h0": 2, "h1": 2}  # /metrics: one row per host, by its id
    await run_until_done(hosts, tasks)
    await engine.shutdown()
