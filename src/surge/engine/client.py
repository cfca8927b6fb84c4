"""EngineCoreClient: one protocol, two transports — a core on a thread (tests, offline) or in a process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Protocol

import msgspec
import zmq
import zmq.asyncio

from surge.config import EngineConfig, EngineLimits
from surge.engine.core_proc import (
    INPUT_HWM,
    OUTPUT_HWM,
    build_engine_core,
    run_core_loop,
    run_engine_core,
)
from surge.engine.messages import (
    CoreInput,
    CoreOutput,
    EngineCoreFinish,
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequest,
    EngineCoreShutdown,
)

logger = logging.getLogger(__name__)

# How often a client waiting for outputs checks that its core still lives (the watchdog period).
WATCHDOG_POLL_MS = 200
SHUTDOWN_TIMEOUT_S = 5.0


class EngineDeadError(RuntimeError):
    """The engine core is not running (died, restarting or shut down); the server answers 503."""


class EngineOverloadedError(RuntimeError):
    """The queue to the engine core is full; the server answers 503."""


class EngineCoreClient(Protocol):
    """How the async front end talks to an engine core, wherever it runs."""

    @property
    def pid(self) -> int | None: ...

    async def start(self) -> EngineLimits:
        """Start the core and wait until it has loaded; raise EngineDeadError if it dies first."""
        ...

    def add(self, requests: list[EngineCoreRequest]) -> None:
        """Send requests to the core (never blocks)."""
        ...

    def finish(self, msg: EngineCoreFinish) -> None:
        """Abort or stop sequences in the core (never blocks)."""
        ...

    async def get_outputs(self) -> EngineCoreOutputs:
        """The core's next step; raises EngineDeadError once the core is gone."""
        ...

    def is_alive(self) -> bool: ...

    def has_pending_output(self) -> bool:
        """Outputs have arrived that nobody has read yet (the core made progress)."""
        ...

    def kill(self) -> None:
        """Stop the core at once (it is stuck); get_outputs then raises EngineDeadError."""
        ...

    async def close(self) -> None:
        """Stop the core and release what the client holds."""
        ...


def limits_from_ready(msg: EngineCoreReady) -> EngineLimits:
    return EngineLimits(
        num_kv_blocks=msg.num_kv_blocks,
        block_size=msg.block_size,
        max_model_len=msg.max_model_len,
        eos_token_ids=tuple(msg.eos_token_ids),
        vocab_size=msg.vocab_size,
    )


class InprocClient:
    """The core stepped on a dedicated thread of this process; talks through thread-safe queues."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._inputs: queue.SimpleQueue[CoreInput] = queue.SimpleQueue()
        self._outputs: asyncio.Queue[EngineCoreOutputs | None] = asyncio.Queue()  # None = dead
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._killed = False

    @property
    def pid(self) -> int | None:
        return None

    async def start(self) -> EngineLimits:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[EngineLimits] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="surge-engine-core", daemon=True
        )
        self._thread.start()
        return await ready

    def _run(self, ready: asyncio.Future[EngineLimits]) -> None:
        """Thread body: build the core, report ready, loop; a crash reads as a dead core."""
        try:
            core = build_engine_core(self.config)
        except Exception as e:
            logger.exception("engine core failed to start")
            error = EngineDeadError(f"engine core failed to start: {e}")
            self._call(lambda: ready.done() or ready.set_exception(error))
            return
        self._call(lambda: ready.done() or ready.set_result(core.limits))
        try:
            run_core_loop(core, self._get_inputs, self._emit, lambda: not self._closing)
        except Exception:
            logger.exception("engine core thread failed")
        finally:
            self._emit(None)

    def _call(self, fn: Callable[[], object]) -> None:
        """Run fn on the event loop's thread; a closed loop means nobody is listening."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:
            pass

    def _emit(self, outputs: EngineCoreOutputs | None) -> None:
        self._call(lambda: self._outputs.put_nowait(outputs))

    def _get_inputs(self, timeout: float) -> list[CoreInput]:
        try:
            messages = [self._inputs.get(timeout=timeout) if timeout else self._inputs.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                messages.append(self._inputs.get_nowait())
            except queue.Empty:
                return messages

    def add(self, requests: list[EngineCoreRequest]) -> None:
        for req in requests:
            self._inputs.put(req)

    def finish(self, msg: EngineCoreFinish) -> None:
        self._inputs.put(msg)

    async def get_outputs(self) -> EngineCoreOutputs:
        outputs = await self._outputs.get()
        if outputs is None:
            self._outputs.put_nowait(None)  # stays dead for any later caller
            raise EngineDeadError("engine core thread stopped")
        return outputs

    def is_alive(self) -> bool:
        return not self._killed and self._thread is not None and self._thread.is_alive()

    def has_pending_output(self) -> bool:
        return not self._outputs.empty()

    def kill(self) -> None:
        # a thread can't be killed: disown it (a stuck one stays stuck, its outputs go nowhere)
        self._killed = self._closing = True
        self._outputs.put_nowait(None)

    async def close(self) -> None:
        self._closing = True
        self._inputs.put(EngineCoreShutdown())
        if self._thread is not None and not self._killed:
            await asyncio.to_thread(self._thread.join, SHUTDOWN_TIMEOUT_S)


class MPClient:
    """The core in its own process ("spawn": torch and fork don't mix), over zmq PUSH/PULL ipc.

    As with any "spawn" start, a script that creates one needs an `if __name__ == "__main__":` guard.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._tmpdir = Path(tempfile.mkdtemp(prefix="surge-core-"))
        input_addr = f"ipc://{self._tmpdir}/input"
        output_addr = f"ipc://{self._tmpdir}/output"
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        # We connect the input side: a connecting PUSH queues at once, so add() never blocks or
        # fails, even before the core has bound or after it died (the watchdog fails those).
        self._input = self._ctx.socket(zmq.PUSH)
        self._output = self._actx.socket(zmq.PULL)
        for sock in (self._input, self._output):
            sock.setsockopt(zmq.LINGER, 0)
        self._input.setsockopt(zmq.SNDHWM, INPUT_HWM)
        self._output.setsockopt(zmq.RCVHWM, OUTPUT_HWM)
        self._input.connect(input_addr)
        self._output.bind(output_addr)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreOutput)
        self._proc: BaseProcess = multiprocessing.get_context("spawn").Process(
            target=run_engine_core,
            args=(config, input_addr, output_addr),
            name="surge-engine-core",
            daemon=True,  # dies with us if we exit without close()
        )
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    async def start(self) -> EngineLimits:
        self._proc.start()
        logger.info("started engine core process %d", self._proc.pid)
        msg = await self._recv()
        if not isinstance(msg, EngineCoreReady):
            raise EngineDeadError(f"engine core sent {type(msg).__name__} before it was ready")
        return limits_from_ready(msg)

    async def _recv(self) -> CoreOutput:
        """The next message; polls so a dead process is noticed within WATCHDOG_POLL_MS."""
        while True:
            if await self._output.poll(WATCHDOG_POLL_MS):
                return self._decoder.decode(await self._output.recv())
            if not self._proc.is_alive():
                raise EngineDeadError(
                    f"engine core process {self._proc.pid} exited with code {self._proc.exitcode}"
                )

    def add(self, requests: list[EngineCoreRequest]) -> None:
        for req in requests:
            self._send(req)

    def finish(self, msg: EngineCoreFinish) -> None:
        self._send(msg)

    def _send(self, msg: CoreInput) -> None:
        try:
            self._input.send(self._encoder.encode(msg), zmq.NOBLOCK)
        except zmq.Again as e:  # INPUT_HWM messages queued: the core is far behind or stuck
            raise EngineOverloadedError("the engine's input queue is full") from e

    async def get_outputs(self) -> EngineCoreOutputs:
        msg = await self._recv()
        if not isinstance(msg, EngineCoreOutputs):
            raise EngineDeadError(f"engine core sent an unexpected {type(msg).__name__}")
        return msg

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def has_pending_output(self) -> bool:
        return bool(self._output.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self._input.send(self._encoder.encode(EngineCoreShutdown()), zmq.NOBLOCK)
        if self._proc.pid is not None:
            await asyncio.to_thread(self._stop_process)
        self._input.close()
        self._output.close()
        self._ctx.term()
        self._actx.term()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _stop_process(self) -> None:
        """Wait for the asked-for exit, then kill (runs on a worker thread; the core ignores
        SIGTERM so that a signal to the whole process group can't stop it mid-request)."""
        proc = self._proc
        proc.join(SHUTDOWN_TIMEOUT_S)
        if proc.is_alive():
            logger.warning("engine core %d did not stop; killing it", proc.pid)
            proc.kill()
            proc.join()
