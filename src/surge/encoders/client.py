"""EncoderClient: an encoder worker process behind zmq PUSH/PULL ipc, awaited per request."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path

import msgspec
import numpy as np
import zmq
import zmq.asyncio

from surge.encoders.config import EncoderConfig, EncoderInfo
from surge.encoders.messages import (
    AbortRequest,
    CountTokensRequest,
    EncodeRequest,
    EncoderInput,
    EncoderLoadFailed,
    EncoderOutput,
    EncoderReady,
    EncoderResult,
    EncoderShutdown,
    RerankRequest,
)

logger = logging.getLogger(__name__)

# How often the client checks, while it waits for results, that its worker still lives.
WATCHDOG_POLL_MS = 200
SHUTDOWN_TIMEOUT_S = 5.0
RECENT_BATCH_SIZES = 4096


def _worker_main(config: EncoderConfig, input_addr: str, output_addr: str) -> None:
    """The spawned process's target; imports the worker (torch, sentence-transformers) only there."""
    from surge.encoders.worker import run_encoder_worker

    run_encoder_worker(config, input_addr, output_addr)


class EncoderDeadError(RuntimeError):
    """The encoder worker is not running (failed to load, died, or closed); the server answers 503."""


class EncoderRequestError(ValueError):
    """The worker refused this request's input (too long, bad token id); the server answers 400."""


@dataclass(frozen=True)
class EmbedResult:
    """One embed call's rows, in input order, and its token usage."""

    embeddings: np.ndarray  # float32 [n, dim]
    num_tokens: int
    token_counts: list[int] = field(default_factory=list)  # per input, as the model saw it
    batch_sizes: list[int] = field(default_factory=list)  # the model batches its rows ran in


@dataclass(frozen=True)
class RerankResult:
    """One rerank call's score per document, in input order, and its token usage."""

    scores: list[float]
    num_tokens: int
    token_counts: list[int] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)


@dataclass(slots=True)
class EncoderStats:
    """Model batches the worker ran, as its replies report them (for tests, metrics, benchmarks)."""

    num_batches: int = 0
    num_rows: int = 0
    batch_size_counts: Counter[int] = field(default_factory=Counter)  # size -> batches
    recent_batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT_BATCH_SIZES))

    def record(self, batch_sizes: list[int]) -> None:
        """Count batches reported by one reply."""
        self.num_batches += len(batch_sizes)
        self.num_rows += sum(batch_sizes)
        self.batch_size_counts.update(batch_sizes)
        self.recent_batch_sizes.extend(batch_sizes)


class EncoderClient:
    """One encoder model in its own process ("spawn"); many concurrent callers, batched there.

    Create with `await EncoderClient.start(config)` and use from that event loop only; as with
    any "spawn" start, a script that does so needs an `if __name__ == "__main__":` guard.
    """

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        self._tmpdir = Path(tempfile.mkdtemp(prefix="surge-encoder-"))
        input_addr = f"ipc://{self._tmpdir}/input"
        output_addr = f"ipc://{self._tmpdir}/output"
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        # A connecting PUSH queues at once: sends never block or fail, even before the worker binds.
        self._input = self._ctx.socket(zmq.PUSH)
        self._output = self._actx.socket(zmq.PULL)
        for sock in (self._input, self._output):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        self._input.connect(input_addr)
        self._output.bind(output_addr)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(EncoderOutput)
        self._proc: BaseProcess = multiprocessing.get_context("spawn").Process(
            target=_worker_main,
            args=(config, input_addr, output_addr),
            name="surge-encoder",
            daemon=True,  # dies with us if we exit without close()
        )
        self._pending: dict[str, asyncio.Future[EncoderResult]] = {}
        self._req_ids = itertools.count()
        self._reader: asyncio.Task[None] | None = None
        self._dead: EncoderDeadError | None = None
        self._closed = False
        self.stats = EncoderStats()
        self.info: EncoderInfo | None = None

    @classmethod
    async def start(cls, config: EncoderConfig) -> EncoderClient:
        """Start a worker and wait until it has loaded; EncoderDeadError (with why) if it can't."""
        client = cls(config)
        try:
            client._proc.start()
            logger.info("started encoder worker %d for %s", client._proc.pid, config.model_name)
            client.info = await client._wait_ready()
        except BaseException:
            await client.close()
            raise
        client._reader = asyncio.create_task(client._read_loop(), name="surge-encoder-reader")
        return client

    @property
    def pid(self) -> int | None:
        """The worker's process id."""
        return self._proc.pid

    @property
    def num_in_flight(self) -> int:
        """Calls waiting for their answer."""
        return len(self._pending)

    def is_alive(self) -> bool:
        """Whether the worker process runs and the client is open."""
        return not self._closed and self._dead is None and self._proc.is_alive()

    async def embed(
        self, inputs: list[str] | list[list[int]], *, truncate: bool = True, normalize: bool = False
    ) -> EmbedResult:
        """Embed texts, or token-id lists taken as the whole model input (specials included)."""
        if not inputs:
            dim = (self.info.dim if self.info is not None else None) or 0
            return EmbedResult(np.zeros((0, dim), dtype=np.float32), 0)
        texts = [x for x in inputs if isinstance(x, str)]
        token_ids = [x for x in inputs if isinstance(x, list) and all(type(t) is int for t in x)]
        if len(texts) != len(inputs) and len(token_ids) != len(inputs):
            raise EncoderRequestError("inputs must be all strings or all lists of token ids")
        result = await self._call(
            lambda req_id: EncodeRequest(
                req_id, texts or None, token_ids or None, truncate=truncate, normalize=normalize
            )
        )
        array = np.frombuffer(result.embeddings, dtype=np.float32).reshape(result.shape).copy()
        return EmbedResult(array, result.num_tokens, result.token_counts, result.batch_sizes)

    async def rerank(
        self, query: str, documents: list[str], *, truncate: bool = True
    ) -> RerankResult:
        """Score each document against the query (the model's activation applied, as predict())."""
        if not documents:
            return RerankResult([], 0)
        result = await self._call(lambda req_id: RerankRequest(req_id, query, documents, truncate))
        return RerankResult(
            result.scores, result.num_tokens, result.token_counts, result.batch_sizes
        )

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text with the model's special tokens, never truncated (no model run)."""
        if not texts:
            return []
        result = await self._call(lambda req_id: CountTokensRequest(req_id, texts))
        return result.token_counts

    async def _call(self, make: Callable[[str], EncoderInput]) -> EncoderResult:
        """Send one request and await its own result; a cancelled caller aborts it in the worker."""
        if self._dead is not None:
            raise EncoderDeadError(str(self._dead))
        if self._closed:
            raise EncoderDeadError("encoder client is closed")
        req_id = str(next(self._req_ids))
        future: asyncio.Future[EncoderResult] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = future
        try:
            try:
                self._send(make(req_id))
            except (msgspec.EncodeError, OverflowError) as e:  # e.g. a token id past 2**64
                raise EncoderRequestError(f"request cannot be encoded: {e}") from e
            result = await future
        except asyncio.CancelledError:
            if not future.done() and self._dead is None and not self._closed:
                self._send(AbortRequest([req_id]))
            raise
        finally:
            self._pending.pop(req_id, None)
        if result.error is not None:
            raise EncoderRequestError(result.error)
        return result

    def _send(self, msg: EncoderInput) -> None:
        self._input.send(self._encoder.encode(msg), zmq.NOBLOCK)

    def _death(self) -> EncoderDeadError:
        return EncoderDeadError(
            f"encoder worker {self._proc.pid} ({self.config.model_name}) exited with code "
            f"{self._proc.exitcode}"
        )

    async def _next(self) -> EncoderOutput:
        """The next message; polls so a dead worker is noticed within WATCHDOG_POLL_MS."""
        while True:
            if await self._output.poll(WATCHDOG_POLL_MS):
                return self._decoder.decode(await self._output.recv())
            if not self._proc.is_alive():
                # Its last words may have landed just after the poll gave up.
                if await self._output.poll(0):
                    return self._decoder.decode(await self._output.recv())
                raise self._death()

    async def _wait_ready(self) -> EncoderInfo:
        msg = await self._next()
        if isinstance(msg, EncoderLoadFailed):
            raise EncoderDeadError(f"encoder {self.config.model_name} failed to load: {msg.error}")
        if not isinstance(msg, EncoderReady):
            raise EncoderDeadError(f"encoder worker sent {type(msg).__name__} before it was ready")
        if msg.kind not in ("embedding", "rerank"):
            raise EncoderDeadError(f"encoder worker reported an unknown kind {msg.kind!r}")
        return EncoderInfo(msg.name, msg.kind, msg.dim, msg.max_seq_length, msg.vocab_size)

    async def _read_loop(self) -> None:
        """Hand each result to its caller; once the worker is gone, fail every pending call."""
        try:
            while True:
                msg = await self._next()
                if not isinstance(msg, EncoderResult):
                    logger.warning("encoder worker sent an unexpected %s", type(msg).__name__)
                    continue
                self.stats.record(msg.worker_batch_sizes)
                future = self._pending.get(msg.req_id)
                if future is not None and not future.done():  # else its caller went away
                    future.set_result(msg)
        except EncoderDeadError as e:
            if not self._closed:
                logger.error("%s", e)
            self._fail_pending(e)
        except Exception as e:
            logger.exception("encoder client reader failed")
            self._fail_pending(EncoderDeadError(f"encoder client reader failed: {e}"))

    def _fail_pending(self, error: EncoderDeadError) -> None:
        self._dead = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        """Stop the worker, fail calls still waiting, and release sockets and the temp dir."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._fail_pending(EncoderDeadError("encoder client closed"))
        if self._proc.is_alive():
            self._send(EncoderShutdown())
        if self._proc.pid is not None:
            await asyncio.to_thread(self._stop_process)
        self._input.close()
        self._output.close()
        self._ctx.term()
        self._actx.term()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _stop_process(self) -> None:
        """Wait for the asked-for exit, then terminate, then kill (runs on a worker thread)."""
        proc = self._proc
        proc.join(SHUTDOWN_TIMEOUT_S)
        if proc.is_alive():
            logger.warning("encoder worker %d did not stop; terminating it", proc.pid)
            proc.terminate()
            proc.join(SHUTDOWN_TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
            proc.join()
