"""One engine core of a model (a replica): its client, its load as the core reports it, and its
supervision: a stall watchdog, restarts with exponential backoff, and a circuit breaker.

The replica set (AsyncEngine) owns the requests; a replica only carries core sequences for it
and tells it, through a ReplicaOwner, when outputs arrive and when the core has failed (so the
owner can move those sequences to another replica before this one restarts).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from surge.config import EngineConfig, EngineLimits, SupervisorConfig
from surge.engine.client import EngineCoreClient, EngineDeadError
from surge.engine.messages import EngineCoreFinish, EngineCoreOutputs, EngineCoreRequest
from surge.engine.routing import ReplicaLoad

logger = logging.getLogger(__name__)

# A busy core reports every step (tens of ms; seconds for a long prefill on a slow CPU). Silent
# this long with work pending, it gets no new requests while another replica can take them.
SUSPECT_AFTER_S = 5.0


class ReplicaState(str, enum.Enum):
    """Where one replica is: only READY replicas take new work."""

    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"  # its core died or stalled; a new one starts after the backoff
    DRAINING = "draining"  # being removed: finishes its work, takes no new requests
    FAILED = "failed"  # crashed too often: the breaker is open, no more restarts
    STOPPED = "stopped"


@dataclass(frozen=True)
class EngineStats:
    """A core's load as of its latest step (summed over replicas for a model)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prefix_cache_queries: int = (
        0  # prompt tokens looked up in the prefix cache, since the core started
    )
    prefix_cache_hits: int = 0  # of those, tokens found cached
    num_waiting_tokens: int = 0  # tokens of waiting sequences still to compute

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hit tokens / looked-up tokens, 0..1 (0 before any)."""
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    @classmethod
    def from_outputs(cls, outputs: EngineCoreOutputs) -> EngineStats:
        """The load a core reported with one step."""
        return cls(
            num_running=outputs.num_running,
            num_waiting=outputs.num_waiting,
            kv_cache_usage=outputs.kv_cache_usage,
            num_preemptions_total=outputs.num_preemptions_total,
            prefix_cache_queries=outputs.prefix_cache_queries,
            prefix_cache_hits=outputs.prefix_cache_hits,
            num_waiting_tokens=outputs.num_waiting_tokens,
        )

    @classmethod
    def total(cls, stats: list[EngineStats]) -> EngineStats:
        """Counts summed; KV usage averaged (each replica has its own cache of the same size)."""
        if not stats:
            return cls()
        return cls(
            num_running=sum(s.num_running for s in stats),
            num_waiting=sum(s.num_waiting for s in stats),
            kv_cache_usage=sum(s.kv_cache_usage for s in stats) / len(stats),
            num_preemptions_total=sum(s.num_preemptions_total for s in stats),
            prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
            num_waiting_tokens=sum(s.num_waiting_tokens for s in stats),
        )


class ReplicaOwner(Protocol):
    """What a replica tells the replica set."""

    def on_outputs(self, replica: Replica, outputs: EngineCoreOutputs) -> None:
        """A step's outputs arrived from this replica's core."""
        ...

    def on_failure(self, replica: Replica, reason: str) -> None:
        """The core is dead or stuck: move (or fail) its sequences now, before it restarts."""
        ...


class Replica:
    """One engine core and its supervision; all methods run on the event loop's thread."""

    def __init__(
        self,
        index: int,
        config: EngineConfig,
        client_factory: Callable[[EngineConfig], EngineCoreClient],
        supervisor: SupervisorConfig,
        owner: ReplicaOwner,
    ) -> None:
        self.index = index
        self.config = config
        self.supervisor = supervisor
        self.state = ReplicaState.STARTING
        self.stats = EngineStats()
        self.limits: EngineLimits | None = None
        self.seqs: set[str] = set()  # core ids placed here and not finished
        self.num_restarts = 0
        self.last_failure: str | None = None  # why the core last died (kept after a restart)
        self.failed_at: float | None = None  # when (monotonic)
        self.started_at: float | None = None
        self._factory = client_factory
        self._owner = owner
        self._client: EngineCoreClient | None = None
        self._output_task: asyncio.Task[None] | None = None
        self._crash_times: collections.deque[float] = collections.deque()
        self._last_progress = time.monotonic()  # last output from the core, or work arriving
        self._stall_reason: str | None = None
        self._closing = False
        # Load the core has not reported yet: requests sent after the ones its latest step had
        # read. The core counts what it received, so nothing here is a guess that can drift.
        self._num_sent = 0
        self._num_received = 0
        self._unreported: collections.deque[tuple[int, int]] = collections.deque()  # (no, tokens)

    # ---- state -----------------------------------------------------------------------------

    @property
    def is_routable(self) -> bool:
        """Live and ready: new requests and failovers may go here."""
        return self.state is ReplicaState.READY and self.is_alive

    def is_suspect(self, now: float) -> bool:
        """Work pending and no step reported for a while: maybe hung (the watchdog decides at
        stall_timeout); new requests go elsewhere meanwhile when they can."""
        suspect_after = min(SUSPECT_AFTER_S, self.supervisor.stall_timeout / 2)
        return bool(self.seqs) and now - self._last_progress > suspect_after

    @property
    def is_alive(self) -> bool:
        return self._client is not None and self._client.is_alive()

    @property
    def breaker_open(self) -> bool:
        return self.state is ReplicaState.FAILED

    def host_stats(self) -> dict[str, EngineStats] | None:
        """Each remote host's load when this replica's core is a set of hosts (Ray Serve's
        replicas of the model), else None."""
        per_host = getattr(self._client, "host_stats", None)
        return per_host() if callable(per_host) else None

    @property
    def pid(self) -> int | None:
        """The core process's id (None in-process or while none runs)."""
        return None if self._client is None else self._client.pid

    def load(self) -> ReplicaLoad:
        """Outstanding sequences and tokens: the core's latest report plus what it hasn't seen."""
        pending_tokens = sum(tokens for _, tokens in self._unreported)
        return ReplicaLoad(
            self.index,
            self.stats.num_running + self.stats.num_waiting + len(self._unreported),
            self.stats.num_waiting_tokens + pending_tokens,
        )

    # ---- talking to the core ---------------------------------------------------------------

    def send(self, requests: list[EngineCoreRequest]) -> None:
        """Place sequences here and send them to the core (EngineOverloadedError if its queue
        is full; then nothing is counted here and the caller aborts them)."""
        assert self._client is not None
        if not self.seqs:  # the core had nothing to do: its silence so far was idle
            self._last_progress = time.monotonic()
        self._client.add(requests)
        for req in requests:
            self.seqs.add(req.req_id)
            self._num_sent += 1
            tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
            self._unreported.append((self._num_sent, tokens))

    def finish(self, msg: EngineCoreFinish) -> None:
        """Abort or stop sequences in the core, if one runs (unknown ids are ignored there)."""
        for req_id in msg.req_ids:
            self.seqs.discard(req_id)
        if self._client is not None and self.state in (ReplicaState.READY, ReplicaState.DRAINING):
            self._client.finish(msg)

    def forget(self, req_ids: list[str]) -> None:
        """These sequences ended (or moved away): no longer this replica's work."""
        for req_id in req_ids:
            self.seqs.discard(req_id)

    # ---- life cycle ------------------------------------------------------------------------

    async def start(self) -> EngineLimits:
        """Start a fresh core and the task that reads its outputs."""
        client = self._factory(self.config)
        try:
            limits = await client.start()
        except BaseException:
            await client.close()
            raise
        self._client, self.limits = client, limits
        self.stats = EngineStats()
        self._num_sent = self._num_received = 0
        self._unreported.clear()
        self._last_progress = time.monotonic()
        self._stall_reason = None
        self.started_at = time.monotonic()
        self.state = ReplicaState.READY
        self._output_task = asyncio.create_task(
            self._output_loop(client), name=f"surge-outputs-{self.index}"
        )
        return limits

    async def _output_loop(self, client: EngineCoreClient) -> None:
        """Read the core's steps; when the core dies or this loop breaks for any reason (a
        decode or socket error included), hand its sequences back and restart the core."""
        try:
            while True:
                outputs = await client.get_outputs()
                self._last_progress = time.monotonic()
                self._note_report(outputs)
                self._owner.on_outputs(self, outputs)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # EngineDeadError, or anything that broke the loop itself
            if self._closing:
                return
            reason = self._stall_reason or (
                str(e) if isinstance(e, EngineDeadError) else f"output loop failed: {e!r}"
            )
            if not isinstance(e, EngineDeadError):
                logger.exception("replica %d: the engine output loop failed", self.index)
            await self._on_core_failure(client, reason)

    def _note_report(self, outputs: EngineCoreOutputs) -> None:
        self.stats = EngineStats.from_outputs(outputs)
        self._num_received = max(self._num_received, outputs.num_requests_received)
        while self._unreported and self._unreported[0][0] <= self._num_received:
            self._unreported.popleft()

    async def _on_core_failure(self, client: EngineCoreClient, reason: str) -> None:
        logger.error(
            "replica %d: engine core failed: %s; %d sequences to move",
            self.index,
            reason,
            len(self.seqs),
        )
        removing = self.state is ReplicaState.DRAINING
        if not removing:
            self.state = ReplicaState.RESTARTING
        self.stats = EngineStats()
        self._unreported.clear()
        self._note_failure(reason)
        self._owner.on_failure(self, reason)
        self.seqs.clear()
        client.kill()
        await client.close()
        if removing:
            self.state = ReplicaState.STOPPED
            return
        await self._restart()

    def _note_failure(self, reason: str) -> None:
        self.last_failure, self.failed_at = reason, time.monotonic()

    def check_stall(self, now: float) -> None:
        """Kill a core that is alive but stuck: work placed here and no output for stall_timeout."""
        client = self._client
        if client is None or self.state not in (ReplicaState.READY, ReplicaState.DRAINING):
            return
        if not self.seqs:
            return
        silent = now - self._last_progress
        if silent > self.supervisor.stall_timeout and not client.has_pending_output():
            self._stall_reason = (
                f"engine core stalled: no progress for {silent:.0f}s "
                f"with {len(self.seqs)} sequences pending"
            )
            logger.error("replica %d: %s; killing it", self.index, self._stall_reason)
            client.kill()

    def next_restart_delay(self) -> float | None:
        """Record a crash; the delay before the next start, or None once the breaker opens."""
        sup, now = self.supervisor, time.monotonic()
        self._crash_times.append(now)
        while self._crash_times and self._crash_times[0] < now - sup.restart_window:
            self._crash_times.popleft()
        crashes = len(self._crash_times)
        if crashes > sup.max_restarts:
            return None
        return min(sup.restart_delay * 2 ** (crashes - 1), sup.max_restart_delay)

    async def _restart(self) -> None:
        """Start a new core after a backoff; a failed start counts as another crash."""
        while not self._closing:
            delay = self.next_restart_delay()
            if delay is None:
                self.state = ReplicaState.FAILED
                logger.error(
                    "replica %d: engine core crashed %d times in %gs: not restarting it (last: %s)",
                    self.index,
                    len(self._crash_times),
                    self.supervisor.restart_window,
                    self.last_failure,
                )
                return
            logger.info("replica %d: restarting the engine core in %.1fs", self.index, delay)
            await asyncio.sleep(delay)
            if self._closing:
                return
            try:
                await self.start()
            except Exception as e:
                logger.exception("replica %d: engine core restart failed", self.index)
                self._note_failure(f"restart failed: {e}")
                continue
            self.num_restarts += 1
            logger.info(
                "replica %d: engine core restarted (%d restarts)", self.index, self.num_restarts
            )
            return

    def drain(self) -> None:
        """Take no new requests from now on (the work placed here goes on)."""
        if self.state is ReplicaState.READY:
            self.state = ReplicaState.DRAINING

    async def stop(self) -> None:
        """Stop the core (its sequences must have ended or moved) and release its client."""
        self._closing = True
        task = self._output_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._output_task = None
        self.state = ReplicaState.STOPPED
        if self._client is not None:
            await self._client.close()
