"""AsyncEngine: the asyncio front end over a model's engine cores (replicas); per-request streams."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from surge.config import EngineConfig, EngineLimits, ReplicaConfig, SupervisorConfig
from surge.engine.client import (
    EngineCoreClient,
    EngineDeadError,
    EngineOverloadedError,
    InprocClient,
    MPClient,
)
from surge.engine.collector import OutputCollector
from surge.engine.inputs import check_request_fits, encode_prompt
from surge.engine.messages import (
    EngineCoreFinish,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
)
from surge.engine.output_processor import OutputProcessor
from surge.engine.outputs import RequestOutput
from surge.engine.placement import PlacementError, check_replicas, replica_config
from surge.engine.replica import EngineStats, Replica, ReplicaState
from surge.engine.request import InvalidRequestError, SamplingParams
from surge.engine.routing import AffinityGuard, AffinityTable, choose, prefix_keys, session_key
from surge.models.default_model import DEFAULT_MODEL_NAME
from surge.models.loader import load_model_files
from surge.tokenizer import Tokenizer

__all__ = [
    "AsyncEngine",
    "EngineDeadError",
    "EngineOverloadedError",
    "EngineStats",
    "PlacementError",
]

logger = logging.getLogger(__name__)

CORE_DIED_ERROR = "engine core died; request aborted"
SHUTDOWN_ERROR = "engine shut down; request aborted"


def model_name(model: str | None) -> str:
    """The name clients see: the default model's name, else the directory or file stem."""
    if model is None or model == DEFAULT_MODEL_NAME:
        return DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    return path.name if path.is_dir() else path.stem


class AsyncEngine:
    """Tokenizes, validates and streams requests over one or more engine cores (replicas), each
    in its own process (or on a thread); routes each request to a replica and moves a failed
    replica's sequences to another so their streams go on."""

    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Tokenizer,
        multiprocess: bool,
        supervisor: SupervisorConfig | None = None,
        client_factory: Callable[[EngineConfig], EngineCoreClient] | None = None,
        replicas: ReplicaConfig | None = None,
    ) -> None:
        """Use `await AsyncEngine.create(...)`: it also starts the cores."""
        self.config = config
        self._client_factory = client_factory or (MPClient if multiprocess else InprocClient)
        self.supervisor = supervisor or SupervisorConfig()
        self.replica_config = replicas or ReplicaConfig()
        self.tokenizer = tokenizer
        self.model_name = model_name(config.model)
        self.multiprocess = multiprocess
        self.limits: EngineLimits
        self.replicas: dict[int, Replica] = {}
        self.num_failovers = 0  # sequences moved to another replica
        self.route_counts: collections.Counter[tuple[int, str]] = collections.Counter()
        self._guard = AffinityGuard(
            self.replica_config.affinity_margin, self.replica_config.affinity_ratio
        )
        self._rr = 0  # round-robin start among equally loaded replicas
        self._affinity = AffinityTable()
        self._num_restarts_gone = 0  # restarts of replicas since removed
        self._processor = OutputProcessor(tokenizer)
        self._collectors: dict[str, OutputCollector] = {}
        self._children: dict[str, list[str]] = {}  # req_id -> its core-side ids (n > 1 fan-out)
        self._seqs: dict[str, _Seq] = {}  # core id -> where it runs and how to resend it
        self._closing = False
        self._watchdog_task: asyncio.Task[None] | None = None
        self._scale_lock = asyncio.Lock()

    @classmethod
    async def create(
        cls,
        config: EngineConfig,
        *,
        multiprocess: bool = True,
        supervisor: SupervisorConfig | None = None,
        replicas: ReplicaConfig | None = None,
    ) -> AsyncEngine:
        """Load the tokenizer, start the cores and wait until they are ready."""
        files = await asyncio.to_thread(load_model_files, config.model)
        tokenizer = await asyncio.to_thread(Tokenizer.from_model_files, files)
        engine = cls(config, tokenizer, multiprocess, supervisor, replicas=replicas)
        await engine.start()
        return engine

    async def start(self) -> None:
        """Start the replicas' cores and the watchdog (create() does this)."""
        total = self.replica_config.replicas
        if self.multiprocess:
            check_replicas(self.config, self.replica_config, total)
        new = [self._new_replica(i, total) for i in range(total)]
        try:
            limits = await asyncio.gather(*(r.start() for r in new))
        except BaseException:
            await asyncio.gather(*(r.stop() for r in new), return_exceptions=True)
            raise
        self.limits = min(limits, key=lambda lim: lim.num_kv_blocks)
        self.replicas = {r.index: r for r in new}
        self._watchdog_task = asyncio.create_task(self._watchdog(), name="surge-watchdog")

    def _new_replica(self, index: int, total: int) -> Replica:
        config = self.config
        if self.multiprocess:
            config = replica_config(self.config, self.replica_config, index, total)
            logger.info(
                "%s replica %d: %s",
                self.model_name,
                index,
                f"CPUs {list(config.cpu_affinity)}, {config.num_threads} threads"
                if config.cpu_affinity
                else f"device {config.device}",
            )
        return Replica(index, config, self._client_factory, self.supervisor, self)

    # ---- state -----------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        """Some replica is alive, loaded and accepting requests."""
        return not self._closing and any(r.is_routable for r in self.replicas.values())

    @property
    def stats(self) -> EngineStats:
        """The replicas' load, summed."""
        return EngineStats.total([r.stats for r in self.replicas.values()])

    @property
    def num_unfinished(self) -> int:
        """Requests added and not finished yet."""
        return len(self._processor)

    @property
    def num_restarts(self) -> int:
        """Core restarts after a crash or stall, over all replicas."""
        return self._num_restarts_gone + sum(r.num_restarts for r in self.replicas.values())

    @property
    def breaker_open(self) -> bool:
        """Every replica crashed too often: none will restart until the model is reloaded."""
        return bool(self.replicas) and all(r.breaker_open for r in self.replicas.values())

    @property
    def last_failure(self) -> str | None:
        """Why a core last failed, over all replicas (kept after its restart)."""
        failed = [r for r in self.replicas.values() if r.failed_at is not None]
        return max(failed, key=lambda r: r.failed_at or 0.0).last_failure if failed else None

    @property
    def core_pid(self) -> int | None:
        """The first replica's core process id (None in-process)."""
        return next((r.pid for _, r in sorted(self.replicas.items())), None)

    @property
    def max_num_seqs(self) -> int:
        """Sequences the replicas that run (or are coming back) can hold at once."""
        serving = [
            r
            for r in self.replicas.values()
            if r.state not in (ReplicaState.FAILED, ReplicaState.STOPPED, ReplicaState.DRAINING)
        ]
        return self.config.max_num_seqs * max(1, len(serving)) * self.replica_config.hosts

    def unread(self, req_id: str) -> tuple[float | None, int]:
        """(monotonic time its oldest unread output arrived, unread chars) of a request."""
        collector = self._collectors.get(req_id)
        if collector is None:
            return None, 0
        return collector.unread_since, collector.unread_chars

    # ---- requests --------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """Text or token ids -> (text, token ids)."""
        return encode_prompt(self.tokenizer, prompt)

    def affinity_keys(self, token_ids: list[int], session: str | None) -> list[bytes]:
        """The client's session if it names one, else the prompt's first KV blocks' hashes."""
        if session:
            return [session_key(session)]
        blocks = self.replica_config.affinity_blocks
        return prefix_keys(token_ids, self.limits.block_size, blocks)

    async def generate(
        self,
        req_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        session: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs, one per step that changed it; the last has finished=True."""
        if not self.is_ready:
            raise EngineDeadError("the engine core is not running")
        text, token_ids = self.encode_prompt(prompt)
        check_request_fits(token_ids, params.max_tokens, self.limits)
        if req_id in self._collectors:
            raise InvalidRequestError(f"request id {req_id!r} is already in use", param="req_id")
        affinity = self.affinity_keys(token_ids, session)
        replica = self._route(affinity)
        core_requests = self._processor.add_request(req_id, text, token_ids, params, priority)
        collector = OutputCollector()
        self._collectors[req_id] = collector
        self._children[req_id] = [r.req_id for r in core_requests]
        for r in core_requests:
            self._seqs[r.req_id] = _Seq(r, affinity, replica)
        finished = False
        try:
            replica.send(core_requests)
            while not finished:
                out = await collector.get()
                finished = out.finished
                yield out
        finally:
            # also on GeneratorExit / CancelledError: the client is gone, free its blocks now
            self._collectors.pop(req_id, None)
            if not finished:
                self._abort_in_core(req_id)
            for cid in self._children.pop(req_id, ()):
                seq = self._seqs.pop(cid, None)
                if seq is not None:
                    seq.replica.forget([cid])

    def _route(self, affinity: list[bytes], exclude: Replica | None = None) -> Replica:
        """The replica a new (or moved) sequence goes to; EngineDeadError if none can take it."""
        candidates = [r for r in self.replicas.values() if r.is_routable and r is not exclude]
        if not candidates:
            raise EngineDeadError("no engine replica is running")
        now = time.monotonic()
        healthy = [r for r in candidates if not r.is_suspect(now)]
        candidates = healthy or candidates
        loads = [r.load() for r in candidates]
        index, why = choose(loads, affinity, self._affinity, self._guard, self._rr)
        self._rr = index + 1
        self.route_counts[(index, why)] += 1
        return self.replicas[index]

    async def abort(self, req_id: str) -> None:
        """Abort a request; its generate() ends with finish_reason "abort"."""
        await self._end(req_id, "abort", None)

    async def fail(self, req_id: str, error: str) -> None:
        """End a request with an error its client sees (e.g. its model is being unloaded)."""
        await self._end(req_id, "error", error)

    async def _end(self, req_id: str, reason: str, error: str | None) -> None:
        children = self._children.get(req_id)
        if children is None:
            return
        self._finish_in_cores(children, "abort")
        self._finish_locally([req_id], reason, error)

    def _finish_in_cores(self, core_ids: list[str], reason: str) -> None:
        """Tell each sequence's replica to abort or stop it (unknown ids are ignored there)."""
        by_replica: dict[int, list[str]] = {}
        for cid in core_ids:
            seq = self._seqs.get(cid)
            if seq is not None:
                by_replica.setdefault(seq.replica.index, []).append(cid)
        for index, ids in by_replica.items():
            replica = self.replicas.get(index)
            if replica is None:
                continue
            try:
                replica.finish(EngineCoreFinish(ids, reason))  # type: ignore[arg-type]
            except EngineOverloadedError:  # the stall watchdog will deal with the core
                logger.warning("could not send %s to replica %d: its queue is full", reason, index)

    def _abort_in_core(self, req_id: str) -> None:
        live = self._processor.abort_request(req_id)
        if live:
            self._finish_in_cores(live, "abort")

    def _finish_locally(self, req_ids: list[str], reason: str, error: str | None) -> None:
        """End requests here, as if the core had finished them, so their streams end."""
        self._finish_seqs(
            [cid for req_id in req_ids for cid in self._children.get(req_id, ())], reason, error
        )

    def _finish_seqs(self, core_ids: list[str], reason: str, error: str | None) -> None:
        outputs = [EngineCoreOutput(cid, [], finish_reason=reason, error=error) for cid in core_ids]
        request_outputs, _ = self._processor.process(EngineCoreOutputs(outputs))
        self._deliver(request_outputs)

    def _deliver(self, request_outputs: list[RequestOutput]) -> None:
        for out in request_outputs:
            collector = self._collectors.get(out.req_id)
            if collector is not None:
                collector.put(out)

    # ---- what replicas report (ReplicaOwner) -----------------------------------------------

    def on_outputs(self, replica: Replica, outputs: EngineCoreOutputs) -> None:
        """Apply a step of `replica`'s core; outputs of sequences no longer placed there (moved
        away after a failover, or aborted) are dropped."""
        if outputs.lost_req_ids:
            lost = [cid for cid in outputs.lost_req_ids if self._placed_on(cid, replica)]
            replica.forget(lost)
            self._move(lost, replica, outputs.lost_reason or "sequence lost", exclude_source=False)
        if not outputs.outputs:
            return
        mine = [o for o in outputs.outputs if self._placed_on(o.req_id, replica)]
        if len(mine) != len(outputs.outputs):
            outputs = msgspec.structs.replace(outputs, outputs=mine)
        try:
            request_outputs, stopped = self._processor.process(outputs)
        except Exception:
            logger.exception("processing engine outputs failed; failing in-flight requests")
            live = [cid for cid in replica.seqs]
            replica.finish(EngineCoreFinish(live, "abort"))
            self._finish_seqs(live, "error", "internal error")
            return
        replica.forget([o.req_id for o in mine if o.finish_reason is not None])
        if stopped:
            replica.finish(EngineCoreFinish(stopped, "stop"))
        self._deliver(request_outputs)

    def _placed_on(self, core_id: str, replica: Replica) -> bool:
        seq = self._seqs.get(core_id)
        return seq is not None and seq.replica is replica

    def on_failure(self, replica: Replica, reason: str) -> None:
        """A replica's core died or stalled: move its sequences to healthy replicas."""
        self._affinity.forget(replica.index)  # its successor starts with an empty cache
        moving = [cid for cid in replica.seqs if self._placed_on(cid, replica)]
        self._move(moving, replica, reason)

    def _move(
        self, core_ids: list[str], source: Replica, reason: str, exclude_source: bool = True
    ) -> None:
        """Resend sequences to other replicas with the tokens they already produced; a sequence
        with no replica to go to, or moved max_failovers times already, ends with an error.
        `source` may take them back when only one of its hosts failed (exclude_source=False)."""
        failed: list[tuple[str, str]] = []
        limit = self.replica_config.max_failovers
        for cid in core_ids:
            seq = self._seqs.get(cid)
            emitted = self._processor.emitted_token_ids(cid)
            if seq is None or emitted is None:
                continue  # finished or gone meanwhile
            if seq.num_failovers >= limit:
                failed.append((cid, f"{CORE_DIED_ERROR}: {reason} (moved {limit} times already)"))
                continue
            try:
                target = self._route(seq.affinity, exclude=source if exclude_source else None)
                seq.replica = target
                target.send([msgspec.structs.replace(seq.request, output_token_ids=emitted)])
            except (EngineDeadError, EngineOverloadedError):
                failed.append((cid, f"{CORE_DIED_ERROR}: {reason}"))
                continue
            seq.num_failovers += 1
            self.num_failovers += 1
            logger.info(
                "moved %s from replica %d to %d after %d tokens",
                cid,
                source.index,
                target.index,
                len(emitted),
            )
        for cid, error in failed:
            self._finish_seqs([cid], "error", error)

    # ---- scaling ---------------------------------------------------------------------------

    async def scale(self, replicas: int, grace_s: float | None = None) -> None:
        """Add or remove replicas until there are `replicas`; a removed one drains first
        (see remove_replica). PlacementError if they can't be placed."""
        if replicas < 1:
            raise ValueError("a model needs at least one replica")
        async with self._scale_lock:
            if self.multiprocess:
                check_replicas(self.config, self.replica_config, replicas)
            while len(self.replicas) < replicas:
                await self._add_replica(replicas)
            while len(self.replicas) > replicas:
                await self._remove_replica(max(self.replicas), grace_s)

    async def _add_replica(self, total: int) -> None:
        index = next(i for i in range(total + len(self.replicas)) if i not in self.replicas)
        replica = self._new_replica(index, total)
        try:
            await replica.start()
        except BaseException:
            await replica.stop()
            raise
        self.replicas[index] = replica
        logger.info("%s: replica %d added (%d now)", self.model_name, index, len(self.replicas))

    async def _remove_replica(self, index: int, grace_s: float | None) -> None:
        """Drain replica `index`: no new work; its sequences get grace_s to finish, then move."""
        replica = self.replicas[index]
        replica.drain()
        grace = self.replica_config.drain_grace if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        while replica.seqs and time.monotonic() < deadline and replica.is_alive:
            await asyncio.sleep(DRAIN_POLL_S)
        moving = [cid for cid in replica.seqs if self._placed_on(cid, replica)]
        if moving:
            replica.finish(EngineCoreFinish(moving, "abort"))
            self._move(moving, replica, f"replica {index} removed")
        await replica.stop()
        del self.replicas[index]
        self._affinity.forget(index)
        self._num_restarts_gone += replica.num_restarts
        logger.info("%s: replica %d removed (%d left)", self.model_name, index, len(self.replicas))

    # ---- the watchdog ----------------------------------------------------------------------

    async def _watchdog(self) -> None:
        """Kill any replica's core that is alive but stuck (work pending, no output)."""
        timeout = self.supervisor.stall_timeout
        while not self._closing:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for replica in list(self.replicas.values()):
                replica.check_stall(now)

    async def shutdown(self) -> None:
        """End in-flight requests, stop the cores and clean up their sockets."""
        if self._closing:
            return
        self._closing = True
        task = self._watchdog_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._watchdog_task = None
        self._finish_locally(list(self._collectors), "error", SHUTDOWN_ERROR)
        await asyncio.gather(*(r.stop() for r in self.replicas.values()))


# How often a draining replica is checked for its last sequence.
DRAIN_POLL_S = 0.05


@dataclass(slots=True)
class _Seq:
    """One core sequence of a request: as first sent, its routing key, where it runs now."""

    request: EngineCoreRequest
    affinity: list[bytes]
    replica: Replica
    num_failovers: int = 0
