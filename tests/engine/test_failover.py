"""Replicas with scripted cores: routing by the cores' own load reports, and sequences moving to
another replica when theirs dies or is removed, so their streams go on. No model, no process."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import pytest

from surge.config import EngineConfig, EngineLimits, ReplicaConfig, SupervisorConfig
from surge.engine.async_engine import AsyncEngine
from surge.engine.client import EngineDeadError
from surge.engine.messages import (
    EngineCoreFinish,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
)
from surge.engine.replica import ReplicaState
from surge.engine.request import SamplingParams
from surge.tokenizer import Tokenizer
from tests.tiny_models import make_tokenizer

pytestmark = pytest.mark.timeout(60)

LIMITS = EngineLimits(num_kv_blocks=256, block_size=4, max_model_len=512, vocab_size=384)
SUP = SupervisorConfig(restart_delay=0.0, stall_timeout=30.0)


def next_token(tokens: list[int]) -> int:
    """The scripted model: each token a function of every token before it (like a real one)."""
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 31 + len(tokens)) % 250 + 3


def expected(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


class ScriptedCore:
    """An EngineCoreClient that steps its sequences one token each per `step()`, reports its
    load like a real core, and can be killed between steps."""

    def __init__(self, name: int) -> None:
        self.name = name
        self.seqs: dict[str, tuple[list[int], list[int], int]] = {}  # id -> prompt, out, max
        self.received: list[EngineCoreRequest] = []
        self.dead = False
        self.closed = False
        self._outputs: asyncio.Queue[EngineCoreOutputs | None] = asyncio.Queue()

    @property
    def pid(self) -> int | None:
        return None

    async def start(self) -> EngineLimits:
        return LIMITS

    def add(self, requests: list[EngineCoreRequest]) -> None:
        for r in requests:
            self.received.append(r)
            max_tokens = r.sampling_params.max_tokens or 1
            self.seqs[r.req_id] = (list(r.prompt_token_ids), list(r.output_token_ids), max_tokens)
        self._report([])

    def finish(self, msg: EngineCoreFinish) -> None:
        for req_id in msg.req_ids:
            self.seqs.pop(req_id, None)

    def step(self) -> None:
        """Every sequence gets its next token; those at max_tokens finish."""
        outputs = []
        for req_id, (prompt, out, max_tokens) in list(self.seqs.items()):
            out.append(next_token(prompt + out))
            done = len(out) >= max_tokens
            outputs.append(
                EngineCoreOutput(req_id, [out[-1]], finish_reason="length" if done else None)
            )
            if done:
                del self.seqs[req_id]
        self._report(outputs)

    def _report(self, outputs: list[EngineCoreOutput]) -> None:
        if not self.dead:
            self._outputs.put_nowait(
                EngineCoreOutputs(
                    outputs, num_running=len(self.seqs), num_requests_received=len(self.received)
                )
            )

    async def get_outputs(self) -> EngineCoreOutputs:
        item = await self._outputs.get()
        if item is None:
            self._outputs.put_nowait(None)
            raise EngineDeadError(f"core {self.name} exited with code -9")
        return item

    def is_alive(self) -> bool:
        return not self.dead

    def has_pending_output(self) -> bool:
        return not self._outputs.empty()

    def kill(self) -> None:
        self.dead = True
        self._outputs.put_nowait(None)

    async def close(self) -> None:
        self.closed = True


class Cluster:
    """An engine over scripted cores (a new core per start, restarts included)."""

    def __init__(self, replicas: int, **options: object) -> None:
        self.cores: list[ScriptedCore] = []
        counter = itertools.count()

        def factory(config: EngineConfig) -> ScriptedCore:
            self.cores.append(ScriptedCore(next(counter)))
            return self.cores[-1]

        tok = Tokenizer(make_tokenizer(), (2,))
        config = ReplicaConfig(replicas=replicas, **options)  # type: ignore[arg-type]
        self.engine = AsyncEngine(
            EngineConfig(), tok, False, SUP, client_factory=factory, replicas=config
        )

    def core_of(self, index: int) -> ScriptedCore:
        client = self.engine.replicas[index]._client
        assert isinstance(client, ScriptedCore)
        return client

    async def step_all(self) -> None:
        for index in list(self.engine.replicas):
            replica = self.engine.replicas.get(index)
            if replica is not None and replica.state is not ReplicaState.STOPPED:
                core = replica._client
                if isinstance(core, ScriptedCore) and not core.dead:
                    core.step()
        await asyncio.sleep(0)  # let the output loops run
        await asyncio.sleep(0)


PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


async def collect(
    engine: AsyncEngine, req_id: str, prompt: list[int]
) -> tuple[list[int], str | None, int]:
    """(token ids, error, number of outputs) of one request, read as a client would."""
    tokens: list[int] = []
    last = None
    count = 0
    async for out in engine.generate(req_id, prompt, PARAMS):
        tokens.extend(out.outputs[0].delta_token_ids)
        last = out
        count += 1
    assert last is not None and last.outputs[0].token_ids == tokens  # deltas add up, no repeats
    return tokens, last.error, count


async def until(cond: Callable[[], bool], cluster: Cluster | None = None) -> None:
    for _ in range(10_000):
        if cond():
            return
        if cluster is not None:
            await cluster.step_all()
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


def prompts(n: int) -> list[list[int]]:
    return [[10 + i, 20 + 2 * i, 30 + 3 * i, 7] for i in range(n)]


def test_a_dead_replicas_streams_continue_on_the_other_with_the_same_tokens() -> None:
    async def go() -> None:
        cluster = Cluster(2, affinity_blocks=0)
        engine = cluster.engine
        await engine.start()
        ps = prompts(8)
        tasks = [asyncio.create_task(collect(engine, f"r{i}", p)) for i, p in enumerate(ps)]
        await until(lambda: sum(len(c.seqs) for c in cluster.cores) == 8)
        assert {len(cluster.core_of(0).seqs), len(cluster.core_of(1).seqs)} == {4}
        for _ in range(5):
            await cluster.step_all()
        victim = cluster.core_of(0)
        moved = set(victim.seqs)
        victim.kill()
        await until(lambda: all(t.done() for t in tasks), cluster)
        for (tokens, error, _), p in zip([t.result() for t in tasks], ps, strict=True):
            assert error is None
            assert tokens == expected(p, 12)
        assert engine.num_failovers == len(moved) == 4
        resumed = [r for r in cluster.core_of(1).received if r.req_id in moved]
        assert len(resumed) == 4 and all(len(r.output_token_ids) == 5 for r in resumed)
        await until(lambda: engine.replicas[0].state is ReplicaState.READY)
        assert engine.num_restarts == 1 and "exited with code -9" in (engine.last_failure or "")
        await engine.shutdown()

    asyncio.run(go())


def test_with_no_other_replica_the_streams_end_with_the_error() -> None:
    async def go() -> None:
        cluster = Cluster(1)
        await cluster.engine.start()
        task = asyncio.create_task(collect(cluster.engine, "only", [5, 6, 7]))
        await until(lambda: bool(cluster.core_of(0).seqs))
        await cluster.step_all()
        cluster.core_of(0).kill()
        tokens, error, _ = await asyncio.wait_for(task, 10)
        assert error is not None and "engine core died" in error and "code -9" in error
        assert tokens == expected([5, 6, 7], 1)
        await cluster.engine.shutdown()

    asyncio.run(go())


def test_failover_is_bounded() -> None:
    async def go() -> None:
        cluster = Cluster(3, max_failovers=1)
        engine = cluster.engine
        await engine.start()
        task = asyncio.create_task(collect(engine, "poison", [9, 9, 9]))
        await until(lambda: any(c.seqs for c in cluster.cores))
        first = next(i for i in engine.replicas if cluster.core_of(i).seqs)
        cluster.core_of(first).kill()
        await until(lambda: any(c.seqs for c in cluster.cores if not c.dead))
        second = next(i for i in engine.replicas if i != first and cluster.core_of(i).seqs)
        cluster.core_of(second).kill()
        tokens, error, _ = await asyncio.wait_for(task, 10)
        assert error is not None and "moved 1 times already" in error
        assert engine.num_failovers == 1
        await engine.shutdown()

    asyncio.run(go())


def test_routing_follows_the_load_the_cores_report() -> None:
    async def go() -> None:
        cluster = Cluster(2, affinity_blocks=0)
        engine = cluster.engine
        await engine.start()
        # sent together, before any core reported: the unreported sends count as load
        tasks = [asyncio.create_task(collect(engine, f"a{i}", [3, i])) for i in range(6)]
        await until(lambda: sum(len(c.seqs) for c in cluster.cores) == 6)
        assert len(cluster.core_of(0).seqs) == len(cluster.core_of(1).seqs) == 3
        # replica 0 reports more work than it got from us (say, long prefills): new work avoids it
        busy = cluster.core_of(0)
        busy._outputs.put_nowait(EngineCoreOutputs([], num_running=40, num_requests_received=3))
        await asyncio.sleep(0.01)
        more = [asyncio.create_task(collect(engine, f"b{i}", [4, i])) for i in range(4)]
        await until(lambda: len(cluster.core_of(1).seqs) == 7)
        assert len(busy.seqs) == 3
        await until(lambda: all(t.done() for t in tasks + more), cluster)
        assert all(t.result()[1] is None for t in tasks + more)
        await engine.shutdown()

    asyncio.run(go())


def test_session_affinity_keeps_a_client_on_one_replica() -> None:
    async def go() -> None:
        cluster = Cluster(3)
        engine = cluster.engine
        await engine.start()
        for turn in range(6):
            await until(lambda: True)
            agen = engine.generate(f"t{turn}", [turn + 3, 4], PARAMS, session="alice")
            task = asyncio.create_task(_drain(agen))
            await until(lambda: any(c.seqs for c in cluster.cores))
            await until(task.done, cluster)
        picked = {i for (i, why) in engine.route_counts if why == "affinity"}
        assert len(picked) == 1 and sum(engine.route_counts.values()) == 6
        await engine.shutdown()

    asyncio.run(go())


async def _drain(agen: object) -> None:
    async for _ in agen:  # type: ignore[attr-defined]
        pass


def test_removing_a_replica_moves_its_streams_after_the_grace() -> None:
    async def go() -> None:
        cluster = Cluster(2, affinity_blocks=0)
        engine = cluster.engine
        await engine.start()
        ps = prompts(6)
        tasks = [asyncio.create_task(collect(engine, f"s{i}", p)) for i, p in enumerate(ps)]
        await until(lambda: sum(len(c.seqs) for c in cluster.cores) == 6)
        await cluster.step_all()
        removed = cluster.core_of(1)
        on_removed = set(removed.seqs)
        await engine.scale(1, grace_s=0.0)
        assert list(engine.replicas) == [0] and removed.closed and not removed.seqs
        await until(lambda: all(t.done() for t in tasks), cluster)
        for (tokens, error, _), p in zip([t.result() for t in tasks], ps, strict=True):
            assert error is None and tokens == expected(p, 12)
        assert engine.num_failovers == len(on_removed) == 3
        await engine.scale(3)
        assert sorted(engine.replicas) == [0, 1, 2] and engine.is_ready
        with pytest.raises(ValueError):
            await engine.scale(0)
        await engine.shutdown()

    asyncio.run(go())


def test_a_draining_replica_finishes_its_work_within_the_grace() -> None:
    async def go() -> None:
        cluster = Cluster(2)
        engine = cluster.engine
        await engine.start()
        tasks = [asyncio.create_task(collect(engine, f"d{i}", p)) for i, p in enumerate(prompts(4))]
        await until(lambda: sum(len(c.seqs) for c in cluster.cores) == 4)
        scaling = asyncio.create_task(engine.scale(1, grace_s=30.0))
        await until(lambda: scaling.done(), cluster)
        await until(lambda: all(t.done() for t in tasks), cluster)
        assert all(t.result()[1] is None for t in tasks)
        assert engine.num_failovers == 0  # finished where they were
        await engine.shutdown()

    asyncio.run(go())


def test_a_silent_replica_gets_no_new_requests_before_the_watchdog_fires() -> None:
    async def go() -> None:
        cluster = Cluster(2, affinity_blocks=0)
        engine = cluster.engine
        await engine.start()
        stuck = asyncio.create_task(collect(engine, "stuck", [1, 2, 3]))
        await until(lambda: any(c.seqs for c in cluster.cores))
        silent = next(i for i in engine.replicas if cluster.core_of(i).seqs)
        engine.replicas[silent]._last_progress -= 10.0  # no step reported for 10 s
        assert engine.replicas[silent].is_suspect(time.monotonic())
        tasks = [asyncio.create_task(collect(engine, f"n{i}", [4, i])) for i in range(4)]
        await until(lambda: len(cluster.core_of(1 - silent).seqs) == 4)
        assert len(cluster.core_of(silent).seqs) == 1
        await until(lambda: all(t.done() for t in [*tasks, stuck]), cluster)
        await engine.shutdown()

    asyncio.run(go())
