"""AsyncEngine: the asyncio front end over an engine core client; per-request output streams."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from surge.config import EngineConfig, EngineLimits, SupervisorConfig
from surge.engine.client import (
    EngineCoreClient,
    EngineDeadError,
    EngineOverloadedError,
    InprocClient,
    MPClient,
)
from surge.engine.collector import OutputCollector
from surge.engine.inputs import check_request_fits, encode_prompt
from surge.engine.messages import EngineCoreFinish, EngineCoreOutput, EngineCoreOutputs
from surge.engine.output_processor import OutputProcessor
from surge.engine.outputs import RequestOutput
from surge.engine.request import InvalidRequestError, SamplingParams
from surge.models.default_model import DEFAULT_MODEL_NAME
from surge.models.loader import load_model_files
from surge.tokenizer import Tokenizer

__all__ = ["AsyncEngine", "EngineDeadError", "EngineOverloadedError", "EngineStats"]

logger = logging.getLogger(__name__)

CORE_DIED_ERROR = "engine core died; request aborted"
SHUTDOWN_ERROR = "engine shut down; request aborted"


@dataclass(frozen=True)
class EngineStats:
    """The core's load as of its latest step."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prefix_cache_queries: int = (
        0  # prompt tokens looked up in the prefix cache, since the core started
    )
    prefix_cache_hits: int = 0  # of those, tokens found cached

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hit tokens / looked-up tokens, 0..1 (0 before any)."""
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )


def model_name(model: str | None) -> str:
    """The name clients see: the default model's name, else the directory or file stem."""
    if model is None or model == DEFAULT_MODEL_NAME:
        return DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    return path.name if path.is_dir() else path.stem


class AsyncEngine:
    """Tokenizes, validates and streams requests; the core runs in its own process (or a thread)."""

    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Tokenizer,
        multiprocess: bool,
        supervisor: SupervisorConfig | None = None,
        client_factory: Callable[[EngineConfig], EngineCoreClient] | None = None,
    ) -> None:
        """Use `await AsyncEngine.create(...)`: it also starts the core."""
        self.config = config
        self._client_factory = client_factory or (MPClient if multiprocess else InprocClient)
        self.supervisor = supervisor or SupervisorConfig()
        self.tokenizer = tokenizer
        self.model_name = model_name(config.model)
        self.multiprocess = multiprocess
        self.limits: EngineLimits
        self.num_restarts = 0
        self.last_failure: str | None = None  # why the core last died (kept after a restart)
        self.breaker_open = False  # too many crashes in the window: no more restarts
        self._crash_times: collections.deque[float] = collections.deque()
        self._client: EngineCoreClient | None = None
        self._processor = OutputProcessor(tokenizer)
        self._collectors: dict[str, OutputCollector] = {}
        self._children: dict[str, list[str]] = {}  # req_id -> its core-side ids (n > 1 fan-out)
        self._stats = EngineStats()
        self._ready = False
        self._closing = False
        self._output_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._last_progress = time.monotonic()  # last output from the core, or work arriving
        self._stall_reason: str | None = None

    @classmethod
    async def create(
        cls,
        config: EngineConfig,
        *,
        multiprocess: bool = True,
        supervisor: SupervisorConfig | None = None,
    ) -> AsyncEngine:
        """Load the tokenizer, start the core and wait until it is ready."""
        files = await asyncio.to_thread(load_model_files, config.model)
        tokenizer = await asyncio.to_thread(Tokenizer.from_model_files, files)
        engine = cls(config, tokenizer, multiprocess, supervisor)
        await engine.start()
        return engine

    async def start(self) -> None:
        """Start the core and the watchdog (create() does this)."""
        await self._start_core()
        self._watchdog_task = asyncio.create_task(self._watchdog(), name="surge-watchdog")

    # ---- state -----------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        """The core is alive, loaded and accepting requests."""
        return self._ready and self._client is not None and self._client.is_alive()

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_unfinished(self) -> int:
        """Requests added and not finished yet."""
        return len(self._processor)

    @property
    def core_pid(self) -> int | None:
        """The core process's id (None in-process)."""
        return None if self._client is None else self._client.pid

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

    async def generate(
        self, req_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs, one per step that changed it; the last has finished=True."""
        if not self.is_ready:
            raise EngineDeadError("the engine core is not running")
        text, token_ids = self.encode_prompt(prompt)
        check_request_fits(token_ids, params.max_tokens, self.limits)
        if req_id in self._collectors:
            raise InvalidRequestError(f"request id {req_id!r} is already in use", param="req_id")
        if not len(self._processor):  # the core had nothing to do: its silence so far was idle
            self._last_progress = time.monotonic()
        core_requests = self._processor.add_request(req_id, text, token_ids, params, priority)
        collector = OutputCollector()
        self._collectors[req_id] = collector
        self._children[req_id] = [r.req_id for r in core_requests]
        finished = False
        try:
            assert self._client is not None
            self._client.add(core_requests)
            while not finished:
                out = await collector.get()
                finished = out.finished
                yield out
        finally:
            # also on GeneratorExit / CancelledError: the client is gone, free its blocks now
            self._collectors.pop(req_id, None)
            self._children.pop(req_id, None)
            if not finished:
                self._abort_in_core(req_id)

    async def abort(self, req_id: str) -> None:
        """Abort a request; its generate() ends with finish_reason "abort"."""
        children = self._children.get(req_id)
        if children is None:
            return
        if self._client is not None:
            self._client.finish(EngineCoreFinish(children, "abort"))  # unknown ids are ignored
        self._finish_locally([req_id], "abort", None)

    async def fail(self, req_id: str, error: str) -> None:
        """End a request with an error its client sees (e.g. its model is being unloaded)."""
        children = self._children.get(req_id)
        if children is None:
            return
        if self._client is not None and self._ready:
            self._client.finish(EngineCoreFinish(children, "abort"))
        self._finish_locally([req_id], "error", error)

    def _abort_in_core(self, req_id: str) -> None:
        live = self._processor.abort_request(req_id)
        if live and self._client is not None and self._ready:
            try:
                self._client.finish(EngineCoreFinish(live, "abort"))
            except EngineOverloadedError:  # the stall watchdog will deal with the core
                logger.warning("could not send the abort of %s: the core's queue is full", req_id)

    def _finish_locally(self, req_ids: list[str], reason: str, error: str | None) -> None:
        """End requests here, as if the core had finished them, so their streams end."""
        outputs = [
            EngineCoreOutput(cid, [], finish_reason=reason, error=error)
            for req_id in req_ids
            for cid in self._children.get(req_id, ())
        ]
        request_outputs, _ = self._processor.process(EngineCoreOutputs(outputs))
        self._deliver(request_outputs)

    def _deliver(self, request_outputs: list[RequestOutput]) -> None:
        for out in request_outputs:
            collector = self._collectors.get(out.req_id)
            if collector is not None:
                collector.put(out)

    # ---- the output loop and watchdog ------------------------------------------------------

    async def _start_core(self) -> None:
        """Start a fresh core and the task that reads its outputs."""
        client = self._client_factory(self.config)
        try:
            self.limits = await client.start()
        except BaseException:
            await client.close()
            raise
        self._client = client
        self._stats = EngineStats()
        self._last_progress = time.monotonic()
        self._stall_reason = None
        self._ready = True
        self._output_task = asyncio.create_task(self._output_loop(client), name="surge-outputs")

    async def _output_loop(self, client: EngineCoreClient) -> None:
        """Read the core's steps into request collectors; if the core dies or this loop fails
        for any reason (a decode or socket error included), fail all and restart the core."""
        try:
            while True:
                outputs = await client.get_outputs()
                self._last_progress = time.monotonic()
                try:
                    self._handle_outputs(client, outputs)
                except Exception:
                    logger.exception("processing engine outputs failed; failing in-flight requests")
                    live = [cid for ids in self._children.values() for cid in ids]
                    client.finish(EngineCoreFinish(live, "abort"))
                    self._finish_locally(list(self._collectors), "error", "internal error")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # EngineDeadError, or anything that broke the loop itself
            if self._closing:
                return
            reason = self._stall_reason or (
                str(e) if isinstance(e, EngineDeadError) else f"output loop failed: {e!r}"
            )
            if not isinstance(e, EngineDeadError):
                logger.exception("the engine output loop failed")
            await self._on_core_failure(client, reason)

    async def _on_core_failure(self, client: EngineCoreClient, reason: str) -> None:
        """Fail every in-flight request with the reason, stop the core, restart (or give up)."""
        logger.error("engine core failed: %s; failing %d requests", reason, len(self._collectors))
        self._ready = False
        self._stats = EngineStats()
        self.last_failure = reason
        self._finish_locally(list(self._collectors), "error", f"{CORE_DIED_ERROR}: {reason}")
        client.kill()
        await client.close()
        await self._restart()

    async def _watchdog(self) -> None:
        """Kill a core that is alive but stuck: work pending and no output for stall_timeout."""
        timeout = self.supervisor.stall_timeout
        while not self._closing:
            await asyncio.sleep(min(1.0, timeout / 4))
            client = self._client
            if client is None or not self._ready or not len(self._processor):
                continue
            silent = time.monotonic() - self._last_progress
            if silent > timeout and not client.has_pending_output():
                self._stall_reason = (
                    f"engine core stalled: no progress for {silent:.0f}s "
                    f"with {len(self._processor)} requests pending"
                )
                logger.error("%s; killing it", self._stall_reason)
                client.kill()

    def _handle_outputs(self, client: EngineCoreClient, outputs: EngineCoreOutputs) -> None:
        self._stats = EngineStats(
            num_running=outputs.num_running,
            num_waiting=outputs.num_waiting,
            kv_cache_usage=outputs.kv_cache_usage,
            num_preemptions_total=outputs.num_preemptions_total,
            prefix_cache_queries=outputs.prefix_cache_queries,
            prefix_cache_hits=outputs.prefix_cache_hits,
        )
        if not outputs.outputs:
            return
        request_outputs, stopped = self._processor.process(outputs)
        if stopped:
            client.finish(EngineCoreFinish(stopped, "stop"))
        self._deliver(request_outputs)

    def _next_restart_delay(self) -> float | None:
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
            delay = self._next_restart_delay()
            if delay is None:
                self.breaker_open = True
                logger.error(
                    "engine core crashed %d times in %gs: not restarting it (last: %s)",
                    len(self._crash_times),
                    self.supervisor.restart_window,
                    self.last_failure,
                )
                return
            logger.info("restarting the engine core in %.1fs", delay)
            await asyncio.sleep(delay)
            try:
                await self._start_core()
            except Exception as e:
                logger.exception("engine core restart failed")
                self.last_failure = f"restart failed: {e}"
                continue
            self.num_restarts += 1
            logger.info("engine core restarted (%d restarts)", self.num_restarts)
            return

    async def shutdown(self) -> None:
        """End in-flight requests, stop the core and clean up its sockets."""
        if self._closing:
            return
        self._closing = True
        self._ready = False
        for task in (self._output_task, self._watchdog_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._output_task = self._watchdog_task = None
        self._finish_locally(list(self._collectors), "error", SHUTDOWN_ERROR)
        if self._client is not None:
            await self._client.close()
