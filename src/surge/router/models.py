"""The model registry: every model the service knows, loaded on demand, unloaded when idle.

Transport-agnostic: the server passes a `starter` that turns a ModelSpec into a running
ModelHandle (an AsyncEngine for chat, an encoder worker for embedding/rerank); the registry only
decides when to start and stop them. All methods run on the event loop's thread.

- Load on demand: `acquire` starts the load of an unloaded model; every concurrent caller awaits
  that one load; a failed load reaches each of them as a ModelLoadError.
- keep_alive (Ollama's): after its last request ends a model stays loaded keep_alive seconds,
  then `tick` unloads it; 0 unloads it as soon as it is idle; None never. Each `acquire` sets the
  model's keep_alive to the request's, else to the spec's: the latest request wins.
- Pinned models are never expired, never evicted, whatever a request's keep_alive says.
- Memory budget: before a load, unloads in progress are waited for, then idle unpinned models are
  evicted least recently used first (memory.choose_evictions) until the new one fits; if it
  can't, the load fails at once with InsufficientMemoryError and the model stays UNLOADED.
- Crashes: `mark_failed` (or `tick` finding a dead handle) makes it FAILED; the next `acquire`
  after the backoff (state.backoff_delay) restarts it; before then it raises with retry_after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import TypeVar

from surge.process import freeze_loaded_objects
from surge.router.lease import AbortInFlight, Estimator, KeepAlive, Lease, Starter
from surge.router.memory import EvictionCandidate, ModelCost, choose_evictions, estimate_cost
from surge.router.spec import ModelSpec
from surge.router.state import (
    InsufficientMemoryError,
    ModelEntry,
    ModelEvent,
    ModelHandle,
    ModelLoadError,
    ModelNotFound,
    ModelState,
    ModelStatus,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class ModelRegistry:
    """Models by name: states, load on demand, leases, keep_alive expiry, eviction, crash restart."""

    def __init__(
        self,
        specs: Iterable[ModelSpec],
        starter: Starter,
        *,
        budget_bytes: int | None = None,
        estimator: Estimator = estimate_cost,
        abort_in_flight: AbortInFlight | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        """`estimator` runs in a thread at a model's first load; `now` is injectable for tests."""
        self._entries: dict[str, ModelEntry] = {}
        for spec in specs:
            if spec.name in self._entries:
                raise ValueError(f"model name {spec.name!r} registered twice")
            self._entries[spec.name] = ModelEntry(spec)
        self._starter = starter
        self._budget = budget_bytes
        self._estimator = estimator
        self._abort_in_flight = abort_in_flight
        self._now = now
        self._budget_lock = asyncio.Lock()  # one load at a time decides evictions and reserves
        self._tasks: set[asyncio.Future[object]] = set()  # loads, unloads, closes in flight
        self._load_tasks: dict[str, asyncio.Task[None]] = {}
        self._reserved: set[str] = set()  # LOADING models whose memory _make_room granted

    # ---- reading ----
    def names(self) -> list[str]:
        """Registered model names, in registration order."""
        return list(self._entries)

    def spec(self, name: str) -> ModelSpec:
        """The spec of `name`; ModelNotFound if unknown."""
        return self._get(name).spec

    def status(self, name: str) -> ModelStatus:
        """A snapshot of one model; ModelNotFound if unknown."""
        entry = self._get(name)
        return entry.snapshot(self._num_in_flight(entry))

    def states(self) -> dict[str, ModelStatus]:
        """Every model's snapshot, by name."""
        return {name: self.status(name) for name in self._entries}

    def handle(self, name: str) -> ModelHandle | None:
        """The running model while LOADED (or UNLOADING), else None; ModelNotFound if unknown."""
        entry = self._get(name)
        if entry.state in (ModelState.LOADED, ModelState.UNLOADING):
            return entry.handle
        return None

    def events(self, name: str) -> list[ModelEvent]:
        """The model's recent load log (state changes and progress), oldest first."""
        return list(self._get(name).events)

    def report_progress(self, name: str, message: str) -> None:
        """A starter's progress line ("loading weights 3/8") for a model that is LOADING."""
        entry = self._get(name)
        if entry.state is ModelState.LOADING:
            entry.note(self._now(), message)

    # ---- using ----
    async def acquire(
        self, name: str, keep_alive: float | None | KeepAlive = KeepAlive.UNSET
    ) -> Lease:
        """A lease on the loaded model, loading it first if needed; ModelNotFound, ModelLoadError."""
        entry = self._get(name)
        await self._ensure_loaded(entry)
        # no await since _ensure_loaded saw LOADED: nothing can unload it before the lease counts
        entry.keep_alive = entry.spec.keep_alive if keep_alive is KeepAlive.UNSET else keep_alive
        entry.num_leases += 1
        entry.idle.clear()
        return Lease(entry, self._release)

    async def load(self, name: str) -> None:
        """Load `name` now (no lease, keep_alive untouched); ModelLoadError if it can't."""
        await self._ensure_loaded(self._get(name))

    async def _ensure_loaded(self, entry: ModelEntry) -> None:
        while True:
            if entry.state is ModelState.LOADED:
                assert entry.handle is not None
                if entry.handle.is_alive():
                    return
                self.mark_failed(entry.spec.name, "model process is not alive")
            if entry.state is ModelState.FAILED and entry.retry_at is not None:
                wait = entry.retry_at - self._now()
                if wait > 0:
                    raise ModelLoadError(
                        entry.spec.name, entry.reason or "failed", retry_after=wait
                    )
            if entry.state in (ModelState.UNLOADED, ModelState.FAILED):
                self._start_load(entry)
            if entry.state is ModelState.LOADING:
                assert entry.load_done is not None
                # shield: a cancelled waiter (client gone) must not cancel the shared load
                error = await asyncio.shield(entry.load_done)
                if error is not None:
                    raise error.copy()
            elif entry.state is ModelState.UNLOADING:
                assert entry.unload_done is not None
                await asyncio.shield(entry.unload_done)

    def _release(self, entry: ModelEntry, generation: int) -> None:
        if generation != entry.generation:
            return  # that instance is gone (unloaded, crashed); its counts went with it
        entry.num_leases -= 1
        entry.last_used = self._now()
        if entry.num_leases == 0:
            entry.idle.set()
            if entry.keep_alive == 0 and self._expirable(entry):
                self._begin_unload(entry, "keep_alive 0: unloading after the request")
                self._spawn(self._finish_unload(entry, grace_s=0.0))

    # ---- loading ----
    def _start_load(self, entry: ModelEntry) -> None:
        entry.begin_load(self._now())
        entry.load_done = asyncio.get_running_loop().create_future()
        self._load_tasks[entry.spec.name] = self._spawn(self._load(entry))

    async def _load(self, entry: ModelEntry) -> None:
        name = entry.spec.name
        outcome: ModelLoadError | None = ModelLoadError(name, "load interrupted")
        try:
            await self._estimate(entry)
            await self._make_room(entry)
            handle = await self._starter(entry.spec)
        except InsufficientMemoryError as e:
            entry.abandon_load(self._now(), str(e))
            outcome = e
        except asyncio.CancelledError:
            entry.fail(self._now(), "load cancelled: the service is shutting down")
            outcome = ModelLoadError(name, entry.reason or "")
            raise
        except Exception as e:
            logger.warning("model %r failed to load", name, exc_info=True)
            entry.fail(self._now(), str(e) or type(e).__name__)
            outcome = ModelLoadError(name, entry.reason or "", self._retry_after(entry))
        else:
            entry.finish_load(handle, self._now())
            freeze_loaded_objects(collect=False)  # what the load made lives as long as it
            outcome = None
        finally:
            self._load_tasks.pop(name, None)
            self._reserved.discard(name)
            assert entry.load_done is not None
            entry.load_done.set_result(outcome)

    async def _estimate(self, entry: ModelEntry) -> None:
        if entry.cost is not None:
            return
        try:  # reads file headers: off the event loop
            entry.cost = await asyncio.to_thread(self._estimator, entry.spec)
        except Exception:
            if self._budget is not None:
                raise  # no cost, no budget check: fail the load with the reason
            # no budget to check: the cost is only shown, so the load goes on without it
            logger.warning("model %r: no memory estimate", entry.spec.name, exc_info=True)

    async def _make_room(self, entry: ModelEntry) -> None:
        """Evict idle unpinned models (LRU) until `entry` fits the budget, or raise."""
        if self._budget is None or entry.cost is None:
            return
        async with self._budget_lock:
            # memory an unload is giving back (keep_alive, admin) is not in use: wait for it
            # rather than refuse a model that fits once it is back
            unloading = [
                e.unload_done
                for e in self._entries.values()
                if e.state is ModelState.UNLOADING and e.unload_done is not None
            ]
            await asyncio.gather(*(asyncio.shield(f) for f in unloading))
            others = [e for e in self._entries.values() if self._holds_memory(e)]
            in_use = sum(e.cost.total_bytes for e in others if e.cost is not None)
            candidates = [
                EvictionCandidate(
                    e.spec.name, e.cost, e.last_used or 0.0, e.spec.pinned, self._num_in_flight(e)
                )
                for e in others
                if e.state is ModelState.LOADED and e.cost is not None
            ]
            need = entry.cost.total_bytes
            victims = choose_evictions(candidates, need, self._budget, in_use)
            if victims is None:
                evictable = sum(
                    c.cost.total_bytes for c in candidates if not c.pinned and not c.num_in_flight
                )
                raise InsufficientMemoryError(
                    entry.spec.name, need, self._budget, in_use - evictable
                )
            chosen = [self._entries[v] for v in victims]
            for victim in chosen:  # all before any await, so none takes a new lease meanwhile
                self._begin_unload(victim, f"evicted to make room for {entry.spec.name!r}")
            await asyncio.gather(*(self._unload_task(v, 0.0) for v in chosen))
            self._reserved.add(entry.spec.name)  # counted by the next load from here on

    def _holds_memory(self, entry: ModelEntry) -> bool:
        if entry.cost is None:
            return False
        if entry.state is ModelState.LOADING:
            return entry.spec.name in self._reserved  # not yet past _make_room: holds nothing
        return entry.state in (ModelState.LOADED, ModelState.UNLOADING)

    def resize(self, name: str, old_replicas: int, new_replicas: int) -> None:
        """A loaded model's replica count changes: its cost scales with it. Growing past the
        memory budget raises InsufficientMemoryError (nothing is evicted for it)."""
        entry = self._get(name)
        if entry.cost is None or old_replicas == new_replicas or old_replicas < 1:
            return
        cost = ModelCost(
            entry.cost.weights_bytes // old_replicas * new_replicas,
            entry.cost.cache_bytes // old_replicas * new_replicas,
        )
        if self._budget is not None and new_replicas > old_replicas:
            others = sum(
                e.cost.total_bytes
                for e in self._entries.values()
                if e is not entry and e.cost is not None and self._holds_memory(e)
            )
            if others + cost.total_bytes > self._budget:
                raise InsufficientMemoryError(name, cost.total_bytes, self._budget, others)
        entry.cost = cost

    # ---- unloading ----
    async def unload(self, name: str, grace_s: float = 0.0) -> int:
        """Stop new leases, wait up to grace_s for in-flight ones, close; returns how many were aborted.

        In-flight leases still held when grace_s runs out are aborted through `abort_in_flight`
        (so their requests end with a visible error) before the model is closed.
        """
        entry = self._get(name)
        if entry.state is ModelState.LOADING:
            assert entry.load_done is not None
            await asyncio.shield(entry.load_done)
        if entry.state is ModelState.UNLOADING:
            assert entry.unload_done is not None
            await asyncio.shield(entry.unload_done)
            return 0
        if entry.state is not ModelState.LOADED:
            return 0
        self._begin_unload(entry, "unload requested")
        return await self._unload_task(entry, grace_s)

    def _begin_unload(self, entry: ModelEntry, message: str) -> None:
        entry.begin_unload(self._now(), message)
        entry.unload_done = asyncio.get_running_loop().create_future()

    def _unload_task(self, entry: ModelEntry, grace_s: float) -> asyncio.Future[int]:
        # its own task, shielded: a cancelled caller must not leave the model half unloaded
        return asyncio.shield(self._spawn(self._finish_unload(entry, grace_s)))

    async def _finish_unload(self, entry: ModelEntry, grace_s: float) -> int:
        name, num_aborted = entry.spec.name, 0
        if entry.num_leases:
            try:
                await asyncio.wait_for(entry.idle.wait(), timeout=grace_s)
            except asyncio.TimeoutError:
                num_aborted = entry.num_leases
                logger.warning("model %r: aborting %d in-flight requests", name, num_aborted)
                if self._abort_in_flight is not None:
                    try:
                        await self._abort_in_flight(name, f"model {name!r} is being unloaded")
                    except Exception:
                        logger.exception("abort_in_flight(%r) failed", name)
        await self._close_quietly(name, entry.handle)
        entry.finish_unload(self._now())
        assert entry.unload_done is not None
        entry.unload_done.set_result(None)
        return num_aborted

    async def _close_quietly(self, name: str, handle: ModelHandle | None) -> None:
        try:
            if handle is not None:
                await handle.close()
        except Exception:  # it is going away either way; its memory is the OS's now
            logger.exception("closing model %r failed", name)

    # ---- failures and time ----
    def mark_failed(self, name: str, reason: str) -> None:
        """The server saw the model's process die: FAILED with the reason; restarts after backoff."""
        entry = self._get(name)
        if entry.state is not ModelState.LOADED:
            logger.info("model %r: mark_failed ignored while %s", name, entry.state.value)
            return
        handle = entry.handle
        entry.fail(self._now(), reason)
        self._spawn(self._close_quietly(name, handle))

    async def tick(self, now: float | None = None) -> list[str]:
        """Unload idle unpinned models whose keep_alive ran out, fail dead ones; returns unloaded names."""
        now = self._now() if now is None else now
        expired: list[ModelEntry] = []
        for entry in list(self._entries.values()):
            if entry.state is not ModelState.LOADED or entry.handle is None:
                continue
            if not entry.handle.is_alive():
                self.mark_failed(entry.spec.name, "model process exited")
            elif self._expirable(entry) and entry.keep_alive is not None:
                if now >= (entry.last_used or 0.0) + entry.keep_alive:
                    self._begin_unload(entry, f"keep_alive {entry.keep_alive:g}s expired")
                    expired.append(entry)
        await asyncio.gather(*(self._unload_task(e, 0.0) for e in expired))
        return [e.spec.name for e in expired]

    async def run_expiry(self, interval_s: float = 1.0) -> None:
        """Call `tick` every interval_s until cancelled (the server runs this as a task)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.tick()
            except Exception:
                logger.exception("model expiry tick failed")

    async def close(self, grace_s: float = 0.0) -> None:
        """Shut down: cancel loads, unload every loaded model (grace_s for in-flight), join tasks."""
        for task in list(self._load_tasks.values()):
            task.cancel()
        await self.join_background()
        loaded = [n for n, e in self._entries.items() if e.state is ModelState.LOADED]
        await asyncio.gather(*(self.unload(n, grace_s) for n in loaded))
        await self.join_background()

    async def join_background(self) -> None:
        """Wait for background loads and unloads (keep_alive 0, crash cleanup) to finish."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ---- helpers ----
    def _get(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(name, list(self._entries))
        return entry

    def _num_in_flight(self, entry: ModelEntry) -> int:
        # the larger of the registry's leases and the handle's own count: never evict busy work
        handle_count = entry.handle.num_in_flight if entry.handle is not None else 0
        return max(entry.num_leases, handle_count)

    def _busy(self, entry: ModelEntry) -> bool:
        return self._num_in_flight(entry) > 0

    def _expirable(self, entry: ModelEntry) -> bool:
        return entry.state is ModelState.LOADED and not entry.spec.pinned and not self._busy(entry)

    def _retry_after(self, entry: ModelEntry) -> float | None:
        return None if entry.retry_at is None else max(entry.retry_at - self._now(), 0.0)

    def _spawn(self, coro: Coroutine[object, object, _T]) -> asyncio.Task[_T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
