"""A request's hold on a loaded model (`Lease`), and the callables the server gives the registry."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from types import TracebackType

from surge.router.memory import ModelCost
from surge.router.spec import ModelSpec
from surge.router.state import ModelEntry, ModelHandle

# Turns a spec into a running model: AsyncEngine for chat, an encoder worker otherwise. It may
# raise (the model goes FAILED with str(error) as the reason) and may be slow (others keep serving).
Starter = Callable[[ModelSpec], Awaitable[ModelHandle]]
# Called as (model name, reason) when an unload's grace runs out with requests still in flight:
# the server ends them with a visible error before the model is closed.
AbortInFlight = Callable[[str, str], Awaitable[None]]
# A model's memory cost; memory.estimate_cost (bind the CLI's EngineConfig with functools.partial).
Estimator = Callable[[ModelSpec], ModelCost]


class KeepAlive(enum.Enum):
    """Sentinel for "the request gave no keep_alive" (None already means forever)."""

    UNSET = "unset"


class Lease:
    """One request's hold on a loaded model: `async with await registry.acquire(name) as lease:`."""

    def __init__(self, entry: ModelEntry, on_release: Callable[[ModelEntry, int], None]) -> None:
        """Made by ModelRegistry.acquire only."""
        assert entry.handle is not None  # leases are only granted on LOADED models
        self.spec = entry.spec
        self.handle: ModelHandle = entry.handle
        self._on_release = on_release
        self._entry = entry
        self._generation = entry.generation
        self._released = False

    @property
    def name(self) -> str:
        """The model's name."""
        return self.spec.name

    def release(self) -> None:
        """End the hold (idempotent): updates last_used; keep_alive=0 unloads it once idle."""
        if not self._released:
            self._released = True
            self._on_release(self._entry, self._generation)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
