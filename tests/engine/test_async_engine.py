"""AsyncEngine on a tiny model, in-process and with the core in its own process: streams, aborts, faults."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from surge import LLM, EngineConfig, InvalidRequestError, RequestOutput, SamplingParams
from surge.engine.async_engine import AsyncEngine, EngineDeadError
from surge.engine.core_proc import PROCESS_TITLE
from tests.loop_thread import LoopThread

pytestmark = pytest.mark.timeout(180)

T = TypeVar("T")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SHARED = "Many users ask questions at once; the server answers them all. " * 3
PROMPTS = [
    f"{head} {tail}"
    for head in ("The quick", "Paris is", "def add", SHARED)
    for tail in ("brown fox", "the capital", "return a", "ask questions")
]  # 16 prompts; the long shared head gives prefix-cache hits


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path) -> list[RequestOutput]:
    """Each prompt generated alone by the synchronous LLM."""
    llm = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=64)
    return [llm.generate(p, GREEDY)[0] for p in PROMPTS]


@pytest.fixture(scope="module", params=["inproc", "mp"])
def engine(
    request: pytest.FixtureRequest, tiny_model_dir: Path, loop_thread: LoopThread
) -> Iterator[AsyncEngine]:
    multiprocess = request.param == "mp"
    config = EngineConfig(
        model=str(tiny_model_dir),
        dtype="float32",
        num_kv_blocks=64,
        num_threads=1 if multiprocess else None,
    )
    eng = loop_thread.run(AsyncEngine.create(config, multiprocess=multiprocess), timeout=120)
    yield eng
    pid = eng.core_pid
    loop_thread.run(eng.shutdown())
    assert not eng.is_ready
    if pid is not None:
        assert not Path(f"/proc/{pid}").exists(), "the core process outlived shutdown()"


async def collect(
    engine: AsyncEngine, req_id: str, prompt: str | list[int], params: SamplingParams
) -> tuple[RequestOutput, list[RequestOutput]]:
    """Run one request to the end: (final output, every output)."""
    outs = [out async for out in engine.generate(req_id, prompt, params)]
    assert outs and outs[-1].finished and not any(o.finished for o in outs[:-1])
    return outs[-1], outs


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll cond until it holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


def idle(engine: AsyncEngine) -> bool:
    s = engine.stats
    return s.num_running == 0 and s.kv_cache_usage == 0.0 and engine.num_unfinished == 0


def test_concurrent_greedy_matches_llm_and_deltas_concatenate(
    engine: AsyncEngine, loop_thread: LoopThread, expected: list[RequestOutput]
) -> None:
    async def go() -> list[tuple[RequestOutput, list[RequestOutput]]]:
        return await asyncio.gather(
            *(collect(engine, f"conc-{i}", p, GREEDY) for i, p in enumerate(PROMPTS))
        )

    results = loop_thread.run(go())
    for (final, outs), ref in zip(results, expected, strict=True):
        c = final.outputs[0]
        assert c.text == ref.outputs[0].text and c.token_ids == ref.outputs[0].token_ids
        assert c.finish_reason == "length"
        assert "".join(o.outputs[0].delta_text for o in outs) == c.text
        assert [t for o in outs for t in o.outputs[0].delta_token_ids] == c.token_ids
    assert engine.num_unfinished == 0
    assert 0.0 < engine.stats.prefix_cache_hit_rate <= 1.0


def test_n_and_stop_string(
    engine: AsyncEngine, loop_thread: LoopThread, expected: list[RequestOutput]
) -> None:
    full = expected[0].outputs[0].text
    stop = full[3:5]
    params = SamplingParams(n=2, temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop])
    final, _ = loop_thread.run(collect(engine, "stop-n", PROMPTS[0], params))
    assert [c.index for c in final.outputs] == [0, 1]
    for c in final.outputs:
        assert c.finish_reason == "stop" and c.stop_reason == stop
        assert c.text == full[: full.index(stop)]
    loop_thread.run(wait_until(lambda: idle(engine)))


def test_breaking_out_aborts_and_frees_kv(engine: AsyncEngine, loop_thread: LoopThread) -> None:
    async def go() -> None:
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        num = 0
        async for out in engine.generate("break", "The quick brown fox", params):
            num += 1
            assert not out.finished
            if num == 2:
                assert engine.stats.num_running == 1 and engine.stats.kv_cache_usage > 0
                break
        await wait_until(lambda: idle(engine))

    loop_thread.run(go())


def test_cancelling_the_consumer_aborts(engine: AsyncEngine, loop_thread: LoopThread) -> None:
    async def go() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
            async for _ in engine.generate("cancel", "Paris is", params):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()  # what the server's disconnect does
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: idle(engine))

    loop_thread.run(go())


def test_abort_ends_the_stream(engine: AsyncEngine, loop_thread: LoopThread) -> None:
    async def go() -> RequestOutput:
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        gen = engine.generate("abort", "def add", params)
        await anext(gen)
        await engine.abort("abort")
        outs = [out async for out in gen]
        await wait_until(lambda: idle(engine))
        return outs[-1]

    final = loop_thread.run(go())
    assert final.finished and final.outputs[0].finish_reason == "abort"


def test_invalid_requests_raise_before_streaming(
    engine: AsyncEngine, loop_thread: LoopThread
) -> None:
    async def first(prompt: str | list[int], params: SamplingParams) -> None:
        async for _ in engine.generate("bad", prompt, params):
            pytest.fail("an invalid request must not stream")

    with pytest.raises(InvalidRequestError, match="maximum context length"):
        loop_thread.run(first([5] * 600, GREEDY))
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        loop_thread.run(first("Paris", SamplingParams(max_tokens=10_000)))
    with pytest.raises(InvalidRequestError, match="empty"):
        loop_thread.run(first([], GREEDY))
    assert engine.num_unfinished == 0 and engine.is_ready


def test_core_process_title(engine: AsyncEngine) -> None:
    if not engine.multiprocess:
        pytest.skip("in-process core")
    assert engine.core_pid is not None and engine.core_pid != os.getpid()
    cmdline = Path(f"/proc/{engine.core_pid}/cmdline").read_bytes().decode(errors="replace")
    assert cmdline.startswith(PROCESS_TITLE)


def test_killed_core_fails_inflight_and_restarts(
    engine: AsyncEngine, loop_thread: LoopThread, expected: list[RequestOutput]
) -> None:
    if not engine.multiprocess:
        pytest.skip("in-process core")
    old_pid, old_restarts = engine.core_pid, engine.num_restarts
    assert old_pid is not None

    async def go() -> list[RequestOutput]:
        params = SamplingParams(temperature=0.0, max_tokens=480, ignore_eos=True)
        gens = [engine.generate(f"kill-{i}", PROMPTS[i], params) for i in range(4)]
        for g in gens:
            await anext(g)  # each request is running in the core
        os.kill(old_pid, signal.SIGKILL)

        async def drain(g: object) -> RequestOutput:
            return [out async for out in g][-1]  # type: ignore[attr-defined]

        finals = await asyncio.wait_for(asyncio.gather(*(drain(g) for g in gens)), 2.0)
        with pytest.raises(EngineDeadError):  # restarting: a fresh process takes seconds
            await anext(engine.generate("too-soon", "Paris", GREEDY))
        return finals

    for final in loop_thread.run(go()):
        assert final.finished
        assert final.outputs[0].finish_reason == "error"
        assert final.error.startswith("engine core died; request aborted: ")
    assert engine.num_unfinished == 0
    loop_thread.run(wait_until(lambda: engine.is_ready, timeout=60), timeout=90)
    assert engine.num_restarts == old_restarts + 1 and engine.core_pid != old_pid
    final, _ = loop_thread.run(collect(engine, "after-restart", PROMPTS[5], GREEDY))
    assert final.outputs[0].text == expected[5].outputs[0].text
