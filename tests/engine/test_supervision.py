"""The engine supervisor with fake cores: a stuck core is killed, a broken output loop is a
crash, restarts back off, and a breaker stops them. No model, no process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from surge.config import EngineConfig, EngineLimits, SupervisorConfig
from surge.engine.async_engine import AsyncEngine, EngineDeadError
from surge.engine.messages import (
    EngineCoreFinish,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
)
from surge.engine.replica import Replica
from surge.engine.request import SamplingParams
from surge.tokenizer import Tokenizer
from tests.tiny_models import make_tokenizer

pytestmark = pytest.mark.timeout(60)

LIMITS = EngineLimits(num_kv_blocks=64, block_size=16, max_model_len=512, vocab_size=384)
PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


class FakeCore:
    """An EngineCoreClient whose behaviour the test scripts: 'echo' answers each request with one
    token per step until max_tokens, 'silent' never answers (stuck), 'broken' fails to decode,
    'dies' is dead as soon as it started, 'fails_start' never starts."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.killed = False
        self.closed = False
        self._outputs: asyncio.Queue[EngineCoreOutputs | Exception] = asyncio.Queue()

    @property
    def pid(self) -> int | None:
        return None

    async def start(self) -> EngineLimits:
        if self.mode == "fails_start":
            raise EngineDeadError("the model is corrupt")
        if self.mode == "dies":
            self._outputs.put_nowait(EngineDeadError("engine core process exited with code 1"))
        return LIMITS

    def add(self, requests: list[EngineCoreRequest]) -> None:
        if self.mode == "broken":
            self._outputs.put_nowait(ValueError("MsgTypeError: expected array, got int"))
        elif self.mode == "echo":
            for r in requests:
                n = r.sampling_params.max_tokens or 1
                for i in range(n):
                    out = EngineCoreOutput(
                        r.req_id, [5], finish_reason="length" if i == n - 1 else None
                    )
                    self._outputs.put_nowait(EngineCoreOutputs([out]))

    def finish(self, msg: EngineCoreFinish) -> None:
        pass

    async def get_outputs(self) -> EngineCoreOutputs:
        item = await self._outputs.get()
        if isinstance(item, Exception):
            raise item
        return item

    def is_alive(self) -> bool:
        return not self.killed and self.mode != "dies"

    def has_pending_output(self) -> bool:
        return not self._outputs.empty()

    def kill(self) -> None:
        self.killed = True
        self._outputs.put_nowait(EngineDeadError("engine core process exited with code -9"))

    async def close(self) -> None:
        self.closed = True


def make_engine(
    modes: list[str], supervisor: SupervisorConfig
) -> tuple[AsyncEngine, list[FakeCore]]:
    """An engine whose successive cores have the given modes (the last one repeats)."""
    made: list[FakeCore] = []

    def factory(config: EngineConfig) -> FakeCore:
        made.append(FakeCore(modes[min(len(made), len(modes) - 1)]))
        return made[-1]

    tok = Tokenizer(make_tokenizer(), (2,))
    engine = AsyncEngine(EngineConfig(), tok, False, supervisor, client_factory=factory)  # type: ignore[arg-type]
    return engine, made


async def run(engine: AsyncEngine, req_id: str) -> str | None:
    """A request's final error (None if it finished normally)."""
    outs = [o async for o in engine.generate(req_id, [1, 2, 3], PARAMS)]
    return outs[-1].error


async def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def test_stuck_core_is_killed_and_restarted() -> None:
    async def go() -> None:
        sup = SupervisorConfig(stall_timeout=0.2, restart_delay=0.0)
        engine, cores = make_engine(["silent", "echo"], sup)
        await engine.start()
        error = await asyncio.wait_for(run(engine, "stuck"), 20)
        assert error is not None and "stalled" in error and "1 sequences pending" in error
        assert cores[0].killed
        await wait_for(lambda: engine.is_ready)
        assert engine.num_restarts == 1 and "stalled" in (engine.last_failure or "")
        assert await run(engine, "after") is None  # the new core serves
        await engine.shutdown()

    asyncio.run(go())


def test_idle_core_is_never_declared_stuck() -> None:
    async def go() -> None:
        engine, cores = make_engine(["echo"], SupervisorConfig(stall_timeout=0.1))
        await engine.start()
        await asyncio.sleep(0.5)  # silent for longer than the timeout, but with nothing to do
        assert await run(engine, "a") is None
        assert not cores[0].killed and engine.num_restarts == 0
        await engine.shutdown()

    asyncio.run(go())


def test_output_loop_failure_is_a_crash() -> None:
    async def go() -> None:
        engine, cores = make_engine(["broken", "echo"], SupervisorConfig(restart_delay=0.0))
        await engine.start()
        error = await asyncio.wait_for(run(engine, "x"), 20)
        assert error is not None and "output loop failed" in error and "MsgTypeError" in error
        assert cores[0].killed and cores[0].closed
        await wait_for(lambda: engine.is_ready)
        assert engine.num_restarts == 1
        assert await run(engine, "after") is None
        await engine.shutdown()

    asyncio.run(go())


def test_breaker_opens_after_too_many_crashes() -> None:
    async def go() -> None:
        sup = SupervisorConfig(restart_delay=0.0, max_restarts=2, restart_window=60)
        engine, cores = make_engine(["dies", "dies", "fails_start"], sup)
        await engine.start()
        await wait_for(lambda: engine.breaker_open)
        assert not engine.is_ready
        # crash 1 (dies), restart 1 dies too (crash 2), restart 2 fails to start (crash 3): open
        assert len(cores) == 3 and engine.num_restarts == 1
        assert engine.last_failure == "restart failed: the model is corrupt"
        with pytest.raises(EngineDeadError):
            await run(engine, "refused")
        await engine.shutdown()

    asyncio.run(go())


def test_restart_delays_double_up_to_the_cap() -> None:
    sup = SupervisorConfig(restart_delay=0.5, max_restart_delay=3.0, max_restarts=6)
    engine, _ = make_engine(["echo"], sup)
    engine.replicas[0] = Replica(0, EngineConfig(), FakeCore, sup, engine)  # type: ignore[arg-type]
    delays = [engine.replicas[0].next_restart_delay() for _ in range(7)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0, None]
