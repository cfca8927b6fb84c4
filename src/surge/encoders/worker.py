"""The encoder worker: dynamic batching over an EncoderRunner, and its process entry point."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np
import setproctitle
import torch
import zmq

from surge.encoders.batching import plan_batches, window_size
from surge.encoders.config import EncoderConfig
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
from surge.encoders.runner import EncoderInputError, EncoderRunner, Features
from surge.process import die_with_parent, freeze_loaded_objects, ignore_group_signals

logger = logging.getLogger(__name__)

PROCESS_TITLE = "surge::encoder"
# How long an idle worker blocks for input before checking that its parent still lives.
IDLE_POLL_S = 1.0
# How long a worker that failed to load keeps its socket open so the reason reaches the client.
LOAD_FAILED_LINGER_MS = 2000

# (timeout seconds, 0 = don't wait) -> every input message pending, waiting up to timeout for one
GetInputs = Callable[[float], list[EncoderInput]]


@dataclass(slots=True)
class PendingRequest:
    """A request whose rows are queued or running; it is answered once all of them have run."""

    req_id: str
    values: np.ndarray  # [n, dim] embeddings or [n] scores, filled as batches run
    token_counts: list[int]
    normalize: bool = False
    num_done: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    last_batch_id: int = -1
    error: str | None = None


@dataclass(slots=True)
class QueuedRow:
    """One input of a pending request, tokenized, waiting for a batch."""

    req: PendingRequest
    index: int
    features: Features


class EncoderWorker:
    """Queues every request's rows FIFO and runs them in token-budgeted, length-sorted batches."""

    def __init__(
        self, runner: EncoderRunner, config: EncoderConfig, send: Callable[[EncoderOutput], None]
    ) -> None:
        self.runner = runner
        self.config = config
        self.send = send
        self.queue: deque[QueuedRow] = deque()
        self.requests: dict[str, PendingRequest] = {}
        self.num_batches = 0
        self._unreported_batch_sizes: list[int] = []
        self._queue_has_dead_rows = False

    def has_work(self) -> bool:
        """Whether rows are waiting for a batch."""
        return bool(self.queue)

    def handle(self, msg: EncoderInput) -> None:
        """Apply one input message (Shutdown is the loop's business)."""
        if isinstance(msg, CountTokensRequest):
            try:
                counts = self.runner.count_tokens(msg.texts) if msg.texts else []
            except Exception as e:
                self._send_result(EncoderResult(msg.req_id, error=f"could not tokenize: {e}"))
                return
            self._send_result(EncoderResult(msg.req_id, token_counts=counts))
        elif isinstance(msg, AbortRequest):
            for req_id in msg.req_ids:
                req = self.requests.pop(req_id, None)
                if req is not None:
                    req.error = "aborted"
                    self._queue_has_dead_rows = True
        elif isinstance(msg, EncodeRequest | RerankRequest):
            self._add(msg)

    def _add(self, msg: EncodeRequest | RerankRequest) -> None:
        wanted = "rerank" if isinstance(msg, RerankRequest) else "embedding"
        if wanted != self.runner.kind:
            error = f"model {self.runner.info.name!r} is a {self.runner.kind} model, not {wanted}"
            self._send_result(EncoderResult(msg.req_id, error=error))
            return
        if isinstance(msg, EncodeRequest) and (msg.texts is None) == (msg.token_ids is None):
            error = "give exactly one of texts and token_ids"
            self._send_result(EncoderResult(msg.req_id, error=error))
            return
        try:
            rows = self.runner.tokenize(msg)
        except EncoderInputError as e:
            self._send_result(EncoderResult(msg.req_id, error=str(e)))
            return
        except Exception as e:  # a tokenizer that chokes on one input must not stop the worker
            logger.warning("request %s could not be tokenized", msg.req_id, exc_info=True)
            self._send_result(EncoderResult(msg.req_id, error=f"could not tokenize: {e}"))
            return
        dim = self.runner.info.dim
        shape = (len(rows), dim) if dim is not None else (len(rows),)
        req = PendingRequest(
            req_id=msg.req_id,
            values=np.zeros(shape, dtype=np.float32),
            token_counts=[len(row["input_ids"]) for row in rows],
            normalize=isinstance(msg, EncodeRequest) and msg.normalize,
        )
        if not rows:
            self._reply(req)
            return
        self.requests[req.req_id] = req
        self.queue.extend(QueuedRow(req, i, row) for i, row in enumerate(rows))

    def step(self) -> None:
        """Run the next window of queued rows, answering each request as its last row runs."""
        if self._queue_has_dead_rows:  # rows of aborted or failed requests never run
            self.queue = deque(row for row in self.queue if row.req.error is None)
            self._queue_has_dead_rows = False
        lengths = (len(row.features["input_ids"]) for row in self.queue)
        count = window_size(lengths, self.config.max_batch_tokens, self.config.max_batch_size)
        window = [self.queue.popleft() for _ in range(count)]
        batches = plan_batches(
            [len(row.features["input_ids"]) for row in window],
            self.config.max_batch_tokens,
            self.config.max_batch_size,
        )
        for batch in batches:
            rows = [window[i] for i in batch if window[i].req.error is None]
            if rows:
                self._run_batch(rows)
                self._reply_finished(rows)

    def _run_batch(self, rows: list[QueuedRow]) -> None:
        """One model batch; if it raises, each row runs alone so only the bad request fails."""
        try:
            values = self.runner.run([row.features for row in rows])
        except Exception as e:
            if len(rows) == 1:
                logger.warning("request %s failed in the model: %s", rows[0].req.req_id, e)
                self._fail(rows[0].req, f"the model failed on this input: {e}")
                return
            logger.warning("a batch of %d rows failed (%s); running them one by one", len(rows), e)
            for row in rows:
                if row.req.error is None:
                    self._run_batch([row])
            return
        batch_id = self.num_batches
        self.num_batches += 1
        self._unreported_batch_sizes.append(len(rows))
        for row, value in zip(rows, values, strict=True):
            req = row.req
            req.values[row.index] = value
            req.num_done += 1
            if req.last_batch_id != batch_id:
                req.last_batch_id = batch_id
                req.batch_sizes.append(len(rows))

    def _reply_finished(self, rows: list[QueuedRow]) -> None:
        for row in rows:
            req = row.req
            # `is req`: a request with several rows in this batch is answered once
            if self.requests.get(req.req_id) is req and req.num_done == len(req.token_counts):
                del self.requests[req.req_id]
                self._reply(req)

    def _fail(self, req: PendingRequest, error: str) -> None:
        req.error = error
        self.requests.pop(req.req_id, None)
        self._queue_has_dead_rows = True
        self._send_result(EncoderResult(req.req_id, error=error))

    def _reply(self, req: PendingRequest) -> None:
        values = req.values
        common = dict(token_counts=req.token_counts, num_tokens=sum(req.token_counts))
        if values.ndim == 1:
            result = EncoderResult(req.req_id, scores=values.tolist(), **common)
        else:
            if req.normalize:  # as torch.nn.functional.normalize: eps keeps zero rows at zero
                norms = np.linalg.norm(values, axis=1, keepdims=True)
                values = (values / np.maximum(norms, 1e-12)).astype(np.float32)
            shape = (values.shape[0], values.shape[1])
            result = EncoderResult(req.req_id, embeddings=values.tobytes(), shape=shape, **common)
        self._send_result(msgspec.structs.replace(result, batch_sizes=req.batch_sizes))

    def _send_result(self, result: EncoderResult) -> None:
        """Send, carrying the batches run since the last reply (each reaches the client once)."""
        self.send(msgspec.structs.replace(result, worker_batch_sizes=self._unreported_batch_sizes))
        self._unreported_batch_sizes = []


def run_worker_loop(
    worker: EncoderWorker, get_inputs: GetInputs, keep_going: Callable[[], bool]
) -> None:
    """Drain every pending message, run one window, repeat; block when idle; until shutdown."""
    while True:
        messages = get_inputs(0.0 if worker.has_work() else IDLE_POLL_S)
        for msg in messages:
            if isinstance(msg, EncoderShutdown):
                logger.info("encoder worker shutting down")
                return
            worker.handle(msg)
        if worker.has_work():
            worker.step()
        elif not messages and not keep_going():
            logger.warning("encoder worker's owner is gone; exiting")
            return


def _ready_message(runner: EncoderRunner) -> EncoderReady:
    info = runner.info
    return EncoderReady(
        name=info.name,
        kind=info.kind,
        dim=info.dim,
        max_seq_length=info.max_seq_length,
        vocab_size=info.vocab_size,
    )


def run_encoder_worker(config: EncoderConfig, input_addr: str, output_addr: str) -> None:
    """Process entry point: load, send EncoderReady (or EncoderLoadFailed), then serve over zmq."""
    setproctitle.setproctitle(PROCESS_TITLE)
    die_with_parent()
    ignore_group_signals()
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format=f"%(asctime)s {PROCESS_TITLE} %(levelname)s %(message)s"
        )
    if config.nice:
        os.nice(config.nice)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    ctx = zmq.Context()
    inputs = ctx.socket(zmq.PULL)
    outputs = ctx.socket(zmq.PUSH)
    for sock in (inputs, outputs):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a slow client
        sock.setsockopt(zmq.RCVHWM, 0)
    inputs.bind(input_addr)
    outputs.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(EncoderInput)
    parent = multiprocessing.parent_process()

    def get_inputs(timeout: float) -> list[EncoderInput]:
        if not inputs.poll(int(timeout * 1000)):
            return []
        messages = [decoder.decode(inputs.recv())]
        while inputs.poll(0):
            messages.append(decoder.decode(inputs.recv()))
        return messages

    try:
        try:
            runner = EncoderRunner(config)
        except Exception as e:
            logger.exception("encoder model %s failed to load", config.model)
            outputs.setsockopt(zmq.LINGER, LOAD_FAILED_LINGER_MS)
            outputs.send(encoder.encode(EncoderLoadFailed(f"{type(e).__name__}: {e}")))
            raise SystemExit(1) from e
        logger.info("encoder %s loaded: %s", config.model_name, runner.info)
        freeze_loaded_objects(collect=True)
        outputs.send(encoder.encode(_ready_message(runner)))
        worker = EncoderWorker(runner, config, lambda out: outputs.send(encoder.encode(out)))
        run_worker_loop(worker, get_inputs, lambda: parent is None or parent.is_alive())
    finally:
        inputs.close()
        outputs.close()
        ctx.term()
