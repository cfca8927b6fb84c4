"""ModelRegistry with fake handles, a fake starter and a fake clock: no model, no process."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from surge.router import (
    InsufficientMemoryError,
    ModelCost,
    ModelKind,
    ModelLoadError,
    ModelNotFound,
    ModelRegistry,
    ModelSpec,
    ModelState,
    backoff_delay,
)

GiB = 1024**3


class Clock:
    """A settable clock: the registry's `now`."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeHandle:
    """A started model: counts its own in-flight work, can die, records close()."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.num_in_flight = 0
        self.alive = True
        self.closed = False

    def is_alive(self) -> bool:
        return self.alive

    async def close(self) -> None:
        await asyncio.sleep(0)
        self.closed = True


class FakeStarter:
    """Starts FakeHandles; `gate` holds loads until set; `failures` makes a name's loads raise."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.handles: list[FakeHandle] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures: dict[str, str] = {}

    async def __call__(self, spec: ModelSpec) -> FakeHandle:
        self.calls.append(spec.name)
        await self.gate.wait()
        if spec.name in self.failures:
            raise RuntimeError(self.failures[spec.name])
        handle = FakeHandle(spec.name)
        self.handles.append(handle)
        return handle

    def latest(self, name: str) -> FakeHandle:
        return [h for h in self.handles if h.name == name][-1]


def spec(name: str, **kw: object) -> ModelSpec:
    return ModelSpec(name=name, path=f"/models/{name}", kind=ModelKind.CHAT, **kw)  # type: ignore[arg-type]


def make_registry(
    specs: list[ModelSpec],
    costs: dict[str, int] | None = None,
    budget: int | None = None,
    abort: Callable[[str, str], Awaitable[None]] | None = None,
) -> tuple[ModelRegistry, FakeStarter, Clock]:
    starter, clock = FakeStarter(), Clock()
    costs = costs or {}

    def estimator(s: ModelSpec) -> ModelCost:
        return ModelCost(weights_bytes=costs.get(s.name, GiB), cache_bytes=0)

    registry = ModelRegistry(
        specs, starter, budget_bytes=budget, estimator=estimator, abort_in_flight=abort, now=clock
    )
    return registry, starter, clock


def state(registry: ModelRegistry, name: str) -> ModelState:
    return registry.status(name).state


# ---- load on demand ----


def test_fifty_concurrent_acquires_start_one_load() -> None:
    async def main() -> None:
        registry, starter, _ = make_registry([spec("a")])
        starter.gate.clear()
        tasks = [asyncio.create_task(registry.acquire("a")) for _ in range(50)]
        await asyncio.sleep(0.01)
        assert state(registry, "a") is ModelState.LOADING
        starter.gate.set()
        leases = await asyncio.gather(*tasks)
        assert starter.calls == ["a"]
        assert {id(lease.handle) for lease in leases} == {id(starter.latest("a"))}
        assert registry.status("a").num_in_flight == 50
        for lease in leases:
            lease.release()
            lease.release()  # idempotent
        assert registry.status("a").num_in_flight == 0
        assert state(registry, "a") is ModelState.LOADED

    asyncio.run(main())


def test_unknown_model_raises_model_not_found() -> None:
    async def main() -> None:
        registry, _, _ = make_registry([spec("a")])
        with pytest.raises(ModelNotFound, match="'nope' not found; available: a"):
            await registry.acquire("nope")

    asyncio.run(main())


def test_load_failure_reaches_every_waiter_and_other_models_keep_working() -> None:
    async def main() -> None:
        registry, starter, _ = make_registry([spec("bad"), spec("good")])
        starter.failures["bad"] = "weights are corrupt"
        starter.gate.clear()
        tasks = [asyncio.create_task(registry.acquire("bad")) for _ in range(5)]
        await asyncio.sleep(0.01)
        starter.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, ModelLoadError) for r in results)
        assert len({id(r) for r in results}) == 5  # each waiter raises its own error
        assert all(r.reason == "weights are corrupt" for r in results)  # type: ignore[union-attr]
        assert starter.calls == ["bad"]
        status = registry.status("bad")
        assert status.state is ModelState.FAILED and status.reason == "weights are corrupt"
        async with await registry.acquire("good") as lease:
            assert lease.name == "good" and not lease.handle.closed  # type: ignore[attr-defined]

    asyncio.run(main())


def test_failed_load_retries_after_backoff() -> None:
    async def main() -> None:
        registry, starter, clock = make_registry([spec("a")])
        starter.failures["a"] = "boom"
        with pytest.raises(ModelLoadError):
            await registry.acquire("a")
        with pytest.raises(ModelLoadError, match="boom") as err:
            await registry.acquire("a")  # inside the backoff: no new load
        assert err.value.retry_after == pytest.approx(backoff_delay(1))
        assert starter.calls == ["a"]
        del starter.failures["a"]
        clock.t += backoff_delay(1)
        async with await registry.acquire("a"):
            assert state(registry, "a") is ModelState.LOADED
        assert starter.calls == ["a", "a"]

    asyncio.run(main())


def test_estimator_error_fails_the_model_only_under_a_budget() -> None:
    async def main() -> None:
        def estimator(s: ModelSpec) -> ModelCost:
            raise ValueError("model path '/models/a' does not exist")

        registry = ModelRegistry([spec("a")], FakeStarter(), budget_bytes=GiB, estimator=estimator)
        with pytest.raises(ModelLoadError, match="does not exist"):
            await registry.acquire("a")
        assert registry.status("a").state is ModelState.FAILED
        # with no budget the estimate is only informative: the load goes on without it
        registry = ModelRegistry([spec("a")], FakeStarter(), estimator=estimator)
        await registry.load("a")
        assert registry.status("a").state is ModelState.LOADED and registry.status("a").cost is None

    asyncio.run(main())


def test_a_cancelled_waiter_does_not_cancel_the_load() -> None:
    async def main() -> None:
        registry, starter, _ = make_registry([spec("a")])
        starter.gate.clear()
        first = asyncio.create_task(registry.acquire("a"))
        second = asyncio.create_task(registry.acquire("a"))
        await asyncio.sleep(0.01)
        first.cancel()
        starter.gate.set()
        lease = await second
        assert first.cancelled() and state(registry, "a") is ModelState.LOADED
        lease.release()

    asyncio.run(main())


def test_load_without_lease_and_progress_events() -> None:
    async def main() -> None:
        registry, starter, _ = make_registry([spec("a")])
        starter.gate.clear()
        task = asyncio.create_task(registry.load("a"))
        await asyncio.sleep(0.01)
        registry.report_progress("a", "weights 3/8")
        assert registry.status("a").message == "weights 3/8"
        starter.gate.set()
        await task
        messages = [(e.state, e.message) for e in registry.events("a")]
        assert messages == [
            (ModelState.LOADING, "loading"),
            (ModelState.LOADING, "weights 3/8"),
            (ModelState.LOADED, "loaded"),
        ]
        assert registry.status("a").num_in_flight == 0

    asyncio.run(main())


# ---- unload ----


def test_unload_waits_for_in_flight_leases() -> None:
    async def main() -> None:
        registry, starter, _ = make_registry([spec("a")])
        lease = await registry.acquire("a")
        unload = asyncio.create_task(registry.unload("a", grace_s=10.0))
        await asyncio.sleep(0.01)
        assert state(registry, "a") is ModelState.UNLOADING
        assert not starter.latest("a").closed
        lease.release()
        assert await unload == 0
        assert starter.latest("a").closed and state(registry, "a") is ModelState.UNLOADED

    asyncio.run(main())


def test_unload_grace_expiry_aborts_in_flight() -> None:
    async def main() -> None:
        aborted: list[tuple[str, str]] = []

        async def abort(name: str, reason: str) -> None:
            aborted.append((name, reason))

        registry, starter, _ = make_registry([spec("a")], abort=abort)
        leases = [await registry.acquire("a") for _ in range(3)]
        leases[0].release()
        assert await registry.unload("a", grace_s=0.01) == 2
        assert aborted == [("a", "model 'a' is being unloaded")]
        assert starter.latest("a").closed and state(registry, "a") is ModelState.UNLOADED
        for lease in leases[1:]:
            lease.release()  # the aborted requests end later: no effect on the next instance
        lease = await registry.acquire("a")
        assert registry.status("a").num_in_flight == 1
        lease.release()

    asyncio.run(main())


def test_acquire_during_unload_waits_then_reloads() -> None:
    async def main() -> None:
        registry, starter, _ = make_registry([spec("a")])
        lease = await registry.acquire("a")
        unload = asyncio.create_task(registry.unload("a", grace_s=10.0))
        await asyncio.sleep(0.01)
        acquire = asyncio.create_task(registry.acquire("a"))
        await asyncio.sleep(0.01)
        assert not acquire.done()  # no new lease on a model that is unloading
        lease.release()
        await unload
        new = await acquire
        assert starter.calls == ["a", "a"] and new.handle is not lease.handle
        new.release()

    asyncio.run(main())


def test_unload_of_an_unloaded_model_is_a_no_op() -> None:
    async def main() -> None:
        registry, starter, _ = make_registry([spec("a")])
        assert await registry.unload("a") == 0
        assert starter.calls == []

    asyncio.run(main())


# ---- keep_alive ----


def test_keep_alive_zero_unloads_after_the_request() -> None:
    async def main() -> None:
        registry, starter, _ = make_registry([spec("a")])
        other = await registry.acquire("a")
        async with await registry.acquire("a", keep_alive=0):
            pass
        assert state(registry, "a") is ModelState.LOADED  # another request still holds it
        other.release()
        await registry.join_background()
        assert state(registry, "a") is ModelState.UNLOADED and starter.latest("a").closed

    asyncio.run(main())


def test_latest_request_keep_alive_wins() -> None:
    async def main() -> None:
        registry, _, _ = make_registry([spec("a", keep_alive=300.0)])
        async with await registry.acquire("a", keep_alive=None):
            assert registry.status("a").keep_alive is None
        async with await registry.acquire("a", keep_alive=0):
            pass
        lease = await registry.acquire("a", keep_alive=0)  # reloads: 0 unloaded it
        lease2 = await registry.acquire("a")  # no keep_alive: back to the spec's
        lease.release()
        lease2.release()
        await registry.join_background()
        assert state(registry, "a") is ModelState.LOADED
        assert registry.status("a").keep_alive == 300.0

    asyncio.run(main())


def test_tick_expires_idle_models_after_keep_alive() -> None:
    async def main() -> None:
        specs = [spec("a", keep_alive=60.0), spec("forever", keep_alive=None)]
        specs.append(spec("pinned", keep_alive=1.0, pinned=True))
        registry, starter, clock = make_registry(specs)
        for name in ("a", "forever", "pinned"):
            async with await registry.acquire(name):
                pass
        assert registry.status("a").expires_at == clock.t + 60.0
        assert registry.status("pinned").expires_at is None
        assert await registry.tick(clock.t + 59.0) == []
        clock.t += 3600.0
        assert await registry.tick() == ["a"]
        assert starter.latest("a").closed
        assert state(registry, "forever") is ModelState.LOADED
        assert state(registry, "pinned") is ModelState.LOADED

    asyncio.run(main())


def test_tick_never_expires_a_busy_model() -> None:
    async def main() -> None:
        registry, starter, clock = make_registry(
            [spec("a", keep_alive=1.0), spec("b", keep_alive=1.0)]
        )
        lease = await registry.acquire("a")
        async with await registry.acquire("b"):
            pass
        starter.latest("b").num_in_flight = 1  # work the handle reports outside any lease
        clock.t += 100.0
        assert await registry.tick() == []
        lease.release()
        starter.latest("b").num_in_flight = 0
        assert sorted(await registry.tick(clock.t + 1.0)) == ["a", "b"]

    asyncio.run(main())


# ---- memory budget ----


def test_evicts_the_least_recently_used_idle_model_to_fit() -> None:
    async def main() -> None:
        costs = {"a": 2 * GiB, "b": 2 * GiB, "c": 2 * GiB}
        registry, starter, clock = make_registry(
            [spec("a"), spec("b"), spec("c")], costs, budget=5 * GiB
        )
        for name in ("a", "b"):
            async with await registry.acquire(name):
                clock.t += 1.0
        async with await registry.acquire("a"):  # a is now the most recently used
            clock.t += 1.0
        async with await registry.acquire("c"):
            pass
        assert state(registry, "b") is ModelState.UNLOADED and starter.latest("b").closed
        assert state(registry, "a") is ModelState.LOADED
        assert "evicted to make room for 'c'" in [e.message for e in registry.events("b")]

    asyncio.run(main())


def test_pinned_and_busy_models_are_never_evicted() -> None:
    async def main() -> None:
        costs = {"pinned": 2 * GiB, "busy": 2 * GiB, "idle": 2 * GiB, "new": 2 * GiB}
        specs = [spec("pinned", pinned=True), spec("busy"), spec("idle"), spec("new")]
        registry, _, clock = make_registry(specs, costs, budget=6 * GiB)
        await registry.load("pinned")  # least recently used of all
        clock.t += 1
        lease = await registry.acquire("busy")
        clock.t += 1
        await registry.load("idle")
        clock.t += 1
        await registry.load("new")
        states = {n: s.state for n, s in registry.states().items()}
        assert states == {
            "pinned": ModelState.LOADED,
            "busy": ModelState.LOADED,
            "idle": ModelState.UNLOADED,
            "new": ModelState.LOADED,
        }
        lease.release()

    asyncio.run(main())


def test_budget_too_small_fails_fast_and_leaves_the_model_unloaded() -> None:
    async def main() -> None:
        costs = {"pinned": 3 * GiB, "big": 2 * GiB}
        specs = [spec("pinned", pinned=True), spec("big")]
        registry, starter, _ = make_registry(specs, costs, budget=4 * GiB)
        await registry.load("pinned")
        with pytest.raises(InsufficientMemoryError) as err:
            await registry.acquire("big")
        message = str(err.value)
        assert "needs 2.0 GiB" in message and "budget 4.0 GiB" in message
        assert "3.0 GiB in use" in message
        assert (err.value.need_bytes, err.value.in_use_bytes) == (2 * GiB, 3 * GiB)
        status = registry.status("big")
        assert status.state is ModelState.UNLOADED and status.reason is None
        assert starter.calls == ["pinned"]
        await registry.unload("pinned")  # not failed: once there is room, it loads
        async with await registry.acquire("big"):
            assert state(registry, "big") is ModelState.LOADED

    asyncio.run(main())


def test_a_model_bigger_than_the_budget_fails_every_time_without_failing() -> None:
    async def main() -> None:
        registry, starter, _ = make_registry([spec("huge")], {"huge": 9 * GiB}, budget=8 * GiB)
        for _ in range(2):
            with pytest.raises(InsufficientMemoryError, match="needs 9.0 GiB"):
                await registry.acquire("huge")
        assert state(registry, "huge") is ModelState.UNLOADED and starter.calls == []

    asyncio.run(main())


def test_concurrent_loads_reserve_their_memory() -> None:
    async def main() -> None:
        costs = {"a": 3 * GiB, "b": 3 * GiB}
        registry, starter, _ = make_registry([spec("a"), spec("b")], costs, budget=4 * GiB)
        starter.gate.clear()
        load_a = asyncio.create_task(registry.load("a"))
        await asyncio.sleep(0.01)  # a is past the budget check, still starting
        with pytest.raises(InsufficientMemoryError):
            await registry.load("b")
        starter.gate.set()
        await load_a
        assert starter.calls == ["a"]

    asyncio.run(main())


def test_a_load_waits_for_an_unload_in_progress_instead_of_refusing() -> None:
    async def main() -> None:
        costs = {"a": 3 * GiB, "b": 3 * GiB}
        registry, starter, _ = make_registry([spec("a"), spec("b")], costs, budget=4 * GiB)
        lease = await registry.acquire("a")
        unload = asyncio.create_task(registry.unload("a", grace_s=10.0))
        await asyncio.sleep(0.01)
        assert state(registry, "a") is ModelState.UNLOADING  # its memory is on its way back
        acquire_b = asyncio.create_task(registry.acquire("b"))
        await asyncio.sleep(0.01)
        assert not acquire_b.done()
        lease.release()
        assert await unload == 0
        (await acquire_b).release()
        assert state(registry, "b") is ModelState.LOADED and starter.calls == ["a", "b"]

    asyncio.run(main())


# ---- crashes ----


def test_crash_marks_failed_then_restarts_with_backoff() -> None:
    async def main() -> None:
        registry, starter, clock = make_registry([spec("a")])
        lease = await registry.acquire("a")
        first = starter.latest("a")
        registry.mark_failed("a", "engine core died (exit -9)")
        status = registry.status("a")
        assert status.state is ModelState.FAILED and status.reason == "engine core died (exit -9)"
        assert status.retry_at == clock.t + backoff_delay(1)
        lease.release()  # a request of the dead instance ends: nothing to count
        await registry.join_background()
        assert first.closed  # the dead instance is cleaned up
        with pytest.raises(ModelLoadError, match="exit -9") as err:
            await registry.acquire("a")
        assert err.value.retry_after == pytest.approx(1.0)
        clock.t += 1.0
        async with await registry.acquire("a") as lease:
            assert lease.handle is not first
        registry.mark_failed("a", "died again")  # right after the restart: the delay doubles
        assert registry.status("a").retry_at == clock.t + backoff_delay(2) == clock.t + 2.0

    asyncio.run(main())


def test_a_dead_handle_is_found_by_tick_and_by_acquire() -> None:
    async def main() -> None:
        registry, starter, clock = make_registry([spec("a"), spec("b")])
        await registry.load("a")
        await registry.load("b")
        starter.latest("a").alive = False
        assert await registry.tick() == []
        assert registry.status("a").reason == "model process exited"
        starter.latest("b").alive = False
        with pytest.raises(ModelLoadError, match="not alive"):
            await registry.acquire("b")
        clock.t += 1.0
        async with await registry.acquire("b"):
            assert state(registry, "b") is ModelState.LOADED

    asyncio.run(main())


def test_backoff_grows_and_caps_and_resets_after_a_stable_run() -> None:
    assert [backoff_delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(20) == 60.0

    async def main() -> None:
        registry, _, clock = make_registry([spec("a")])
        for _ in range(3):
            await registry.load("a")
            registry.mark_failed("a", "crash")
            clock.t = registry.status("a").retry_at or 0.0
        await registry.load("a")
        clock.t += 3600.0  # an hour of healthy serving
        registry.mark_failed("a", "crash")
        assert registry.status("a").retry_at == clock.t + 1.0

    asyncio.run(main())


def test_close_unloads_everything() -> None:
    async def main() -> None:
        registry, starter, _ = make_registry([spec("a"), spec("b"), spec("c")])
        await registry.load("a")
        await registry.load("b")
        starter.gate.clear()
        loading = asyncio.create_task(registry.load("c"))
        await asyncio.sleep(0.01)
        await registry.close()
        assert all(h.closed for h in starter.handles)
        assert state(registry, "a") is ModelState.UNLOADED
        with pytest.raises(ModelLoadError, match="shutting down"):
            await loading

    asyncio.run(main())


def test_duplicate_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        ModelRegistry([spec("a"), spec("a")], FakeStarter())


def test_scaling_replicas_scales_the_cost_under_the_budget() -> None:
    async def main() -> None:
        costs = {"a": 2 * GiB, "b": 1 * GiB}  # a: 2 replicas of 1 GiB each
        registry, _, _ = make_registry([spec("a", replicas=2), spec("b")], costs, budget=5 * GiB)
        await registry.load("a")
        await registry.load("b")
        registry.resize("a", 2, 4)  # 4 GiB + b's 1 GiB: fits exactly
        assert registry.status("a").cost == ModelCost(4 * GiB, 0)
        with pytest.raises(InsufficientMemoryError, match="needs 5.0 GiB, memory budget 5.0 GiB"):
            registry.resize("a", 4, 5)
        assert registry.status("a").cost == ModelCost(4 * GiB, 0)  # unchanged by the refusal
        registry.resize("a", 4, 1)  # shrinking is always allowed
        assert registry.status("a").cost == ModelCost(1 * GiB, 0)

    asyncio.run(main())
