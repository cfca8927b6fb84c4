"""RemoteCoreClient: the engine-core client of a front end whose cores are remote hosts.

It speaks AsyncEngine's EngineCoreClient protocol, so a model served through Ray Serve keeps all
of the front end: detokenizing, stop strings, admission, metrics, and failover. Each sequence is
one stream to the hosts (the transport picks a host); when a stream breaks, its sequence is
reported lost and AsyncEngine resends it with the tokens it already produced. One host dying
never makes this client "dead": the transport routes the resent sequences to the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

import msgspec

from surge.config import EngineLimits
from surge.engine.client import EngineDeadError
from surge.engine.messages import EngineCoreFinish, EngineCoreOutputs, EngineCoreRequest
from surge.engine.replica import EngineStats
from surge.serving.wire import decode_chunk, decode_limits, encode

logger = logging.getLogger(__name__)

# A host not heard from for this long no longer counts in the model's load (it was scaled
# down or died; its successor reports under a new id).
HOST_STATS_TTL_S = 30.0


class RemoteStream(Protocol):
    """One sequence's steps from some host (msgpack HostChunks); cancel() ends it there."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    def cancel(self) -> None: ...


class RemoteHosts(Protocol):
    """A model's engine hosts as a transport reaches them (a Ray Serve deployment handle)."""

    async def limits(self) -> bytes:
        """Some host's EngineLimits (waits for one to start)."""
        ...

    def stream(self, request: bytes) -> RemoteStream:
        """Run one sequence (an encoded EngineCoreRequest) on some host."""
        ...


class RemoteCoreClient:
    """EngineCoreClient over remote hosts: one stream per sequence, steps merged into one queue."""

    def __init__(self, hosts: RemoteHosts) -> None:
        self._hosts = hosts
        self._outputs: asyncio.Queue[EngineCoreOutputs | None] = asyncio.Queue()  # None: closed
        self._streams: dict[str, asyncio.Task[None]] = {}
        self._host_stats: dict[str, tuple[float, EngineCoreOutputs]] = {}
        self._num_added = 0
        self._closed = False

    @property
    def pid(self) -> int | None:
        return None

    async def start(self) -> EngineLimits:
        """The hosts' limits (they are all built from the same engine config)."""
        return decode_limits(await self._hosts.limits())

    def add(self, requests: list[EngineCoreRequest]) -> None:
        """Start one stream per sequence."""
        if self._closed:
            raise EngineDeadError("the remote engine client is closed")
        for request in requests:
            self._num_added += 1
            self._streams[request.req_id] = asyncio.create_task(
                self._pump(request), name=f"surge-remote-{request.req_id}"
            )

    def finish(self, msg: EngineCoreFinish) -> None:
        """Abort or stop sequences: closing a stream aborts it on its host."""
        for req_id in msg.req_ids:
            task = self._streams.pop(req_id, None)
            if task is not None:
                task.cancel()

    async def get_outputs(self) -> EngineCoreOutputs:
        item = await self._outputs.get()
        if item is None:
            raise EngineDeadError("the remote engine client is closed")
        return item

    def is_alive(self) -> bool:
        return not self._closed

    def has_pending_output(self) -> bool:
        return not self._outputs.empty()

    def kill(self) -> None:
        """The stall watchdog gave up on the sequences here: each is lost and resent, the hosts
        stay (a hung host is the transport's to replace: Ray Serve's health check)."""
        streams, self._streams = self._streams, {}
        for task in streams.values():
            task.cancel()
        if streams:
            self._lose(list(streams), "no progress from its engine host")

    async def close(self) -> None:
        self._closed = True
        streams, self._streams = self._streams, {}
        for task in streams.values():
            task.cancel()
        await asyncio.gather(*streams.values(), return_exceptions=True)
        self._outputs.put_nowait(None)

    def host_stats(self) -> dict[str, EngineStats]:
        """Each live host's load as of its latest step."""
        now = time.monotonic()
        return {
            host: EngineStats.from_outputs(outputs)
            for host, (seen, outputs) in self._host_stats.items()
            if now - seen < HOST_STATS_TTL_S
        }

    # ---- one sequence ----------------------------------------------------------------------

    async def _pump(self, request: EngineCoreRequest) -> None:
        stream = self._hosts.stream(encode(request))
        finished = False
        try:
            async for data in stream:
                chunk = decode_chunk(data)
                self._host_stats[chunk.host] = (time.monotonic(), chunk.outputs)
                finished = any(o.finish_reason is not None for o in chunk.outputs.outputs)
                self._outputs.put_nowait(self._with_totals(chunk.outputs))
                if finished:
                    break
            if not finished:
                self._lose([request.req_id], "its engine host ended the stream early")
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as e:  # the host died, or raised SequenceLost, or the transport failed
            self._lose([request.req_id], _describe(e))
        finally:
            if self._streams.get(request.req_id) is asyncio.current_task():
                del self._streams[request.req_id]

    def _lose(self, req_ids: list[str], reason: str) -> None:
        logger.warning("%d sequences lost: %s", len(req_ids), reason)
        lost = EngineCoreOutputs([], lost_req_ids=req_ids, lost_reason=reason)
        self._outputs.put_nowait(self._with_totals(lost))

    def _with_totals(self, outputs: EngineCoreOutputs) -> EngineCoreOutputs:
        """A step with the load of all live hosts summed (the front end's view of the model);
        every sequence sent counts as received, so nothing stays "unreported"."""
        total = EngineStats.total(list(self.host_stats().values()))
        return msgspec.structs.replace(
            outputs,
            num_running=total.num_running,
            num_waiting=total.num_waiting,
            kv_cache_usage=total.kv_cache_usage,
            num_preemptions_total=total.num_preemptions_total,
            prefix_cache_queries=total.prefix_cache_queries,
            prefix_cache_hits=total.prefix_cache_hits,
            num_waiting_tokens=total.num_waiting_tokens,
            num_requests_received=self._num_added,
        )


def _describe(error: BaseException) -> str:
    """A transport error in one line (Ray's wrap the remote traceback)."""
    text = str(error).strip().splitlines()
    lines = [line for line in text if line.strip()]
    last = lines[-1] if lines else ""
    return f"{type(error).__name__}: {last}"[:300]
