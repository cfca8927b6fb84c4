"""CoreHost: one engine core (a Replica, with its restarts) serving sequences one stream each.

This is the model side of a remote deployment: the front end sends one sequence per call and
reads that sequence's steps back. Detokenizing, stop strings and failover stay in the front end
(AsyncEngine), which is what makes a host replaceable: a sequence whose host dies is resent,
with the tokens it already produced, to another host.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import msgspec

from surge.config import EngineConfig, EngineLimits, SupervisorConfig
from surge.engine.client import EngineCoreClient, EngineOverloadedError, MPClient
from surge.engine.messages import EngineCoreFinish, EngineCoreOutputs, EngineCoreRequest
from surge.engine.replica import Replica, ReplicaState

logger = logging.getLogger(__name__)


class SequenceLost(RuntimeError):
    """This host can't carry the sequence on (its core died, or it isn't ready): the front end
    resends it elsewhere."""


# What a sequence's queue carries: a step, or why the sequence was lost.
_Item = EngineCoreOutputs | SequenceLost


class CoreHost:
    """An engine core and its supervision, streaming each sequence's steps to its caller."""

    def __init__(
        self,
        config: EngineConfig,
        supervisor: SupervisorConfig | None = None,
        client_factory: Callable[[EngineConfig], EngineCoreClient] = MPClient,
        host_id: str = "",
    ) -> None:
        self.host_id = host_id
        self.replica = Replica(0, config, client_factory, supervisor or SupervisorConfig(), self)
        self._queues: dict[str, asyncio.Queue[_Item]] = {}
        self.num_aborted = 0  # sequences their caller closed before they finished
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> EngineLimits:
        """Start the core; its limits once it is ready."""
        limits = await self.replica.start()
        self._watchdog = asyncio.create_task(self._watch(), name="surge-host-watchdog")
        return limits

    @property
    def limits(self) -> EngineLimits:
        """What the core found when it (first) started."""
        assert self.replica.limits is not None, "start() first"
        return self.replica.limits

    @property
    def healthy(self) -> bool:
        """False once the core crashed too often (the breaker is open): replace this host."""
        return self.replica.state is not ReplicaState.FAILED

    def work(self) -> int:
        """Sequences running or waiting here, as the core reports them plus those it hasn't
        seen yet: the autoscaling signal. An idle core reports nothing after an abort, so its
        last report is capped by the streams still open here."""
        return min(self.replica.load().num_seqs, len(self._queues))

    async def stream(self, request: EngineCoreRequest) -> AsyncIterator[EngineCoreOutputs]:
        """Run one sequence; yield each step that changed it, the last one finished. Closing
        the stream early (the caller went away) aborts it in the core."""
        if request.req_id in self._queues:
            raise ValueError(f"sequence {request.req_id!r} is already running here")
        if not self.replica.is_routable:
            raise SequenceLost(f"engine host {self.host_id} is {self.replica.state.value}")
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queues[request.req_id] = queue
        finished = False
        try:
            try:
                self.replica.send([request])
            except EngineOverloadedError as e:
                raise SequenceLost(f"engine host {self.host_id}: {e}") from e
            while not finished:
                item = await queue.get()
                if isinstance(item, SequenceLost):
                    raise item
                finished = any(o.finish_reason is not None for o in item.outputs)
                yield item
        finally:
            self._queues.pop(request.req_id, None)
            if not finished:
                self.num_aborted += 1
                self.replica.finish(EngineCoreFinish([request.req_id], "abort"))

    # ---- ReplicaOwner ----------------------------------------------------------------------

    def on_outputs(self, replica: Replica, outputs: EngineCoreOutputs) -> None:
        """Hand each sequence its own part of the step (with the core's load); a sequence
        that only left the queue this step hears that too (its queue time)."""
        mine = {out.req_id: [out] for out in outputs.outputs}
        scheduled = set(outputs.first_scheduled_req_ids)
        for req_id in mine.keys() | scheduled:
            queue = self._queues.get(req_id)
            if queue is not None:
                part = msgspec.structs.replace(
                    outputs,
                    outputs=mine.get(req_id, []),
                    first_scheduled_req_ids=[req_id] if req_id in scheduled else [],
                )
                queue.put_nowait(part)
        replica.forget([o.req_id for o in outputs.outputs if o.finish_reason is not None])

    def on_failure(self, replica: Replica, reason: str) -> None:
        """The core died or stalled (it restarts on its own): its sequences are lost here."""
        lost = SequenceLost(f"engine host {self.host_id}: {reason}")
        for req_id in list(replica.seqs):
            queue = self._queues.get(req_id)
            if queue is not None:
                queue.put_nowait(lost)

    # ---- life cycle ------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Kill the core if it is alive but stuck (as AsyncEngine's watchdog does)."""
        timeout = self.replica.supervisor.stall_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            self.replica.check_stall(time.monotonic())

    async def stop(self) -> None:
        """Stop the core; open streams end as lost (the front end resends them elsewhere)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        lost = SequenceLost(f"engine host {self.host_id} stopped")
        for queue in self._queues.values():
            queue.put_nowait(lost)
        await self.replica.stop()
