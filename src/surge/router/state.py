"""A model's lifecycle: the `ModelState` enum, one method per transition, errors, and backoff.

    UNLOADED ──begin_load──▶ LOADING ──finish_load──▶ LOADED ──begin_unload──▶ UNLOADING
        ▲                     │  │                      │                          │
        │◀──── abandon_load ──┘  └─fail─▶ FAILED ◀─fail┘                          │
        │◀──────────────────────────────── finish_unload ─────────────────────────┘
    FAILED ──begin_load (once the backoff has passed)──▶ LOADING

`abandon_load` is the memory budget saying "not now": the model goes back to UNLOADED, not
FAILED, because a later request may fit. Only the registry (router/models.py) calls these.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from surge.router.memory import ModelCost, format_bytes
from surge.router.spec import ModelKind, ModelSpec

logger = logging.getLogger(__name__)

# Restart backoff after the n-th consecutive failure (a failed load or a crash):
# min(BACKOFF_BASE_S * 2**(n-1), BACKOFF_MAX_S), i.e. 1, 2, 4, ... 60 s. A model that stayed
# loaded for STABLE_AFTER_S before it crashed starts over at 1 s, so one crash a day never
# grows the delay while a crash loop does.
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 60.0
_MAX_EVENTS = 32


class ModelState(str, enum.Enum):
    """Where a model is in its lifecycle (llama.cpp router mode's states, plus unloading)."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


class ModelHandle(Protocol):
    """A started model, as the starter returns it: an engine, an encoder worker, a replica set."""

    @property
    def num_in_flight(self) -> int:
        """Requests it is working on now (the registry never evicts or expires a busy model)."""
        ...

    def is_alive(self) -> bool:
        """False once its process (or any replica it can't do without) has died."""
        ...

    async def close(self) -> None:
        """Stop it and free its memory; in-flight requests end with an error."""
        ...


class ModelNotFound(LookupError):
    """No model of that name is registered (HTTP 404)."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"model {name!r} not found; available: {', '.join(known) or 'none'}")
        self.name = name


class ModelLoadError(RuntimeError):
    """A model could not be loaded (HTTP 503); `retry_after` is the seconds until it may retry."""

    def __init__(self, name: str, reason: str, retry_after: float | None = None) -> None:
        super().__init__(f"model {name!r} is unavailable: {reason}")
        self.name = name
        self.reason = reason
        self.retry_after = retry_after

    def copy(self) -> ModelLoadError:
        """A fresh error with the same fields: each waiter raises its own (own traceback)."""
        return ModelLoadError(self.name, self.reason, self.retry_after)


class InsufficientMemoryError(ModelLoadError):
    """The model doesn't fit the memory budget even after evicting every idle unpinned model."""

    def __init__(self, name: str, need_bytes: int, budget_bytes: int, in_use_bytes: int) -> None:
        reason = (
            f"needs {format_bytes(need_bytes)}, memory budget {format_bytes(budget_bytes)}, "
            f"{format_bytes(in_use_bytes)} in use by models that are pinned, busy or loading"
        )
        super().__init__(name, reason)
        self.need_bytes = need_bytes
        self.budget_bytes = budget_bytes
        self.in_use_bytes = in_use_bytes

    def copy(self) -> InsufficientMemoryError:
        """A fresh error with the same numbers."""
        return InsufficientMemoryError(
            self.name, self.need_bytes, self.budget_bytes, self.in_use_bytes
        )


def backoff_delay(num_failures: int) -> float:
    """Seconds before the next load after `num_failures` consecutive failures (>= 1)."""
    return min(BACKOFF_BASE_S * 2 ** (max(num_failures, 1) - 1), BACKOFF_MAX_S)


@dataclass(frozen=True)
class ModelEvent:
    """One line of a model's load log: when, the state then, and what happened."""

    time: float
    state: ModelState
    message: str


@dataclass(frozen=True)
class ModelStatus:
    """A snapshot of one model for /v1/models, /ready and logs; times are the registry clock's."""

    name: str
    kind: ModelKind
    state: ModelState
    reason: str | None  # why it failed; None unless FAILED
    message: str | None  # the latest event (load progress, "evicted to fit ...")
    pinned: bool
    keep_alive: float | None  # the effective one: the latest request's, else the spec's
    loaded_at: float | None
    last_used: float | None
    expires_at: float | None  # when idle expiry unloads it; None = never, busy, or not loaded
    retry_at: float | None  # FAILED: when the next acquire may restart it
    cost: ModelCost | None  # None until first estimated (at the first load)
    num_in_flight: int


_ALLOWED: dict[str, tuple[ModelState, ...]] = {
    "begin_load": (ModelState.UNLOADED, ModelState.FAILED),
    "finish_load": (ModelState.LOADING,),
    "abandon_load": (ModelState.LOADING,),
    "fail": (ModelState.LOADING, ModelState.LOADED),
    "begin_unload": (ModelState.LOADED,),
    "finish_unload": (ModelState.UNLOADING,),
}


@dataclass(slots=True)
class ModelEntry:
    """One model's mutable state inside the registry; changed only through its transitions."""

    spec: ModelSpec
    state: ModelState = ModelState.UNLOADED
    reason: str | None = None
    handle: ModelHandle | None = None  # while LOADED or UNLOADING
    cost: ModelCost | None = None
    loaded_at: float | None = None
    last_used: float | None = None
    keep_alive: float | None = None
    num_leases: int = 0
    generation: int = 0  # bumped when a loaded instance goes away; stale leases compare it
    num_failures: int = 0
    retry_at: float | None = None
    load_done: asyncio.Future[ModelLoadError | None] | None = None
    unload_done: asyncio.Future[None] | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    events: deque[ModelEvent] = field(default_factory=lambda: deque(maxlen=_MAX_EVENTS))

    def __post_init__(self) -> None:
        self.keep_alive = self.spec.keep_alive
        self.idle.set()

    def snapshot(self, num_in_flight: int) -> ModelStatus:
        """This model's ModelStatus; expires_at only for a LOADED, idle, unpinned model."""
        expires = None
        idle = self.state is ModelState.LOADED and not num_in_flight and not self.spec.pinned
        if idle and self.keep_alive is not None and self.last_used is not None:
            expires = self.last_used + self.keep_alive
        return ModelStatus(
            name=self.spec.name,
            kind=self.spec.kind,
            state=self.state,
            reason=self.reason,
            message=self.events[-1].message if self.events else None,
            pinned=self.spec.pinned,
            keep_alive=self.keep_alive,
            loaded_at=self.loaded_at,
            last_used=self.last_used,
            expires_at=expires,
            retry_at=self.retry_at if self.state is ModelState.FAILED else None,
            cost=self.cost,
            num_in_flight=num_in_flight,
        )

    def _move(self, transition: str, to: ModelState, now: float, message: str) -> None:
        if self.state not in _ALLOWED[transition]:
            raise RuntimeError(f"model {self.spec.name!r}: {transition} from {self.state.value}")
        logger.info("model %r: %s -> %s: %s", self.spec.name, self.state.value, to.value, message)
        self.state = to
        self.note(now, message)

    def note(self, now: float, message: str) -> None:
        """Append to the load log without changing state (load progress)."""
        self.events.append(ModelEvent(now, self.state, message))

    def begin_load(self, now: float) -> None:
        """UNLOADED/FAILED -> LOADING."""
        self._move("begin_load", ModelState.LOADING, now, "loading")
        self.reason = None

    def finish_load(self, handle: ModelHandle, now: float) -> None:
        """LOADING -> LOADED: serving from now on."""
        self._move("finish_load", ModelState.LOADED, now, "loaded")
        self.handle, self.loaded_at, self.last_used = handle, now, now

    def abandon_load(self, now: float, message: str) -> None:
        """LOADING -> UNLOADED: not loaded now (memory), but not failed: a later try may fit."""
        self._move("abandon_load", ModelState.UNLOADED, now, message)

    def fail(self, now: float, reason: str) -> None:
        """LOADING/LOADED -> FAILED with the reason; the next load waits out the backoff."""
        stable = self.loaded_at is not None and now - self.loaded_at >= STABLE_AFTER_S
        self.num_failures = 1 if stable else self.num_failures + 1
        self.retry_at = now + backoff_delay(self.num_failures)
        self._move("fail", ModelState.FAILED, now, reason)
        self.reason = reason
        self._drop_instance()

    def begin_unload(self, now: float, message: str) -> None:
        """LOADED -> UNLOADING: no new leases from here on."""
        self._move("begin_unload", ModelState.UNLOADING, now, message)

    def finish_unload(self, now: float) -> None:
        """UNLOADING -> UNLOADED: closed; a healthy unload clears the failure count."""
        self._move("finish_unload", ModelState.UNLOADED, now, "unloaded")
        self.num_failures = 0
        self._drop_instance()

    def _drop_instance(self) -> None:
        self.handle, self.loaded_at = None, None
        self.num_leases = 0
        self.generation += 1
        self.keep_alive = self.spec.keep_alive  # a request's override lived as long as the instance
        self.idle.set()
