"""AsyncEngine: the asyncio front end over an engine core client; per-request output streams."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from surge.config import EngineConfig, EngineLimits
from surge.engine.client import EngineCoreClient, EngineDeadError, InprocClient, MPClient
from surge.engine.inputs import check_request_fits, encode_prompt
from surge.engine.messages import EngineCoreFinish, EngineCoreOutput, EngineCoreOutputs
from surge.engine.output_processor import OutputProcessor
from surge.engine.outputs import RequestOutput
from surge.engine.request import InvalidRequestError, SamplingParams
from surge.models.default_model import DEFAULT_MODEL_NAME
from surge.models.loader import load_model_files
from surge.tokenizer import Tokenizer

__all__ = ["AsyncEngine", "EngineDeadError", "EngineStats"]

logger = logging.getLogger(__name__)

CORE_DIED_ERROR = "engine core died; request aborted"
SHUTDOWN_ERROR = "engine shut down; request aborted"
MAX_RESTART_DELAY_S = 30.0


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

    def __init__(self, config: EngineConfig, tokenizer: Tokenizer, multiprocess: bool) -> None:
        """Use `await AsyncEngine.create(...)`: it also starts the core."""
        self.config = config
        self.tokenizer = tokenizer
        self.model_name = model_name(config.model)
        self.multiprocess = multiprocess
        self.limits: EngineLimits
        self.num_restarts = 0
        self._client: EngineCoreClient | None = None
        self._processor = OutputProcessor(tokenizer)
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._children: dict[str, list[str]] = {}  # req_id -> its core-side ids (n > 1 fan-out)
        self._stats = EngineStats()
        self._ready = False
        self._closing = False
        self._output_task: asyncio.Task[None] | None = None

    @classmethod
    async def create(cls, config: EngineConfig, *, multiprocess: bool = True) -> AsyncEngine:
        """Load the tokenizer, start the core and wait until it is ready."""
        files = await asyncio.to_thread(load_model_files, config.model)
        tokenizer = await asyncio.to_thread(Tokenizer.from_model_files, files)
        engine = cls(config, tokenizer, multiprocess)
        await engine._start_core()
        return engine

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
        check_request_fits(len(token_ids), params.max_tokens, self.limits)
        if req_id in self._queues:
            raise InvalidRequestError(f"request id {req_id!r} is already in use", param="req_id")
        core_requests = self._processor.add_request(req_id, text, token_ids, params, priority)
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[req_id] = queue
        self._children[req_id] = [r.req_id for r in core_requests]
        finished = False
        try:
            assert self._client is not None
            self._client.add(core_requests)
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            # also on GeneratorExit / CancelledError: the client is gone, free its blocks now
            self._queues.pop(req_id, None)
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

    def _abort_in_core(self, req_id: str) -> None:
        live = self._processor.abort_request(req_id)
        if live and self._client is not None and self._ready:
            self._client.finish(EngineCoreFinish(live, "abort"))

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
            queue = self._queues.get(out.req_id)
            if queue is not None:
                queue.put_nowait(out)

    # ---- the output loop and watchdog ------------------------------------------------------

    async def _start_core(self) -> None:
        """Start a fresh core and the task that reads its outputs."""
        client: EngineCoreClient = (
            MPClient(self.config) if self.multiprocess else InprocClient(self.config)
        )
        try:
            self.limits = await client.start()
        except BaseException:
            await client.close()
            raise
        self._client = client
        self._stats = EngineStats()
        self._ready = True
        self._output_task = asyncio.create_task(self._output_loop(client), name="surge-outputs")

    async def _output_loop(self, client: EngineCoreClient) -> None:
        """Read the core's steps into request queues; when the core dies, fail all and restart."""
        try:
            while True:
                outputs = await client.get_outputs()
                try:
                    self._handle_outputs(client, outputs)
                except Exception:
                    logger.exception("processing engine outputs failed; failing in-flight requests")
                    live = [cid for ids in self._children.values() for cid in ids]
                    client.finish(EngineCoreFinish(live, "abort"))
                    self._finish_locally(list(self._queues), "error", "internal error")
        except EngineDeadError as e:
            if self._closing:
                return
            logger.error("%s; failing %d requests and restarting it", e, len(self._queues))
            self._ready = False
            self._stats = EngineStats()
            self._finish_locally(list(self._queues), "error", CORE_DIED_ERROR)
            await client.close()
            await self._restart()

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

    async def _restart(self) -> None:
        """Start a new core, backing off while starts fail."""
        delay = 0.5
        while not self._closing:
            try:
                await self._start_core()
            except Exception:
                logger.exception("engine core restart failed; retrying in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RESTART_DELAY_S)
            else:
                self.num_restarts += 1
                logger.info("engine core restarted (%d restarts)", self.num_restarts)
                return

    async def shutdown(self) -> None:
        """End in-flight requests, stop the core and clean up its sockets."""
        if self._closing:
            return
        self._closing = True
        self._ready = False
        task, self._output_task = self._output_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._finish_locally(list(self._queues), "error", SHUTDOWN_ERROR)
        if self._client is not None:
            await self._client.close()
