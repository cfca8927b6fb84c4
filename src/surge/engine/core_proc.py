"""The engine core's busy loop, and its process entry point behind zmq sockets."""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections.abc import Callable

import msgspec
import setproctitle
import zmq

from surge.config import EngineConfig
from surge.engine.core import EngineCore
from surge.engine.messages import (
    CoreInput,
    EngineCoreFinish,
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequest,
    EngineCoreShutdown,
)
from surge.models.loader import load_model_files
from surge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PROCESS_TITLE = "surge::engine-core"
# How long an idle core blocks for input before checking that its parent still lives.
IDLE_POLL_S = 1.0

# (timeout seconds, 0 = don't wait) -> every input message pending, waiting up to timeout for one
GetInputs = Callable[[float], list[CoreInput]]


def build_engine_core(config: EngineConfig) -> EngineCore:
    """Load the model named by the config and build its EngineCore (the slow part of start-up)."""
    files = load_model_files(config.model)
    tokenizer = Tokenizer.from_model_files(files)
    return EngineCore(config, files, tokenizer.eos_token_ids)


def ready_message(core: EngineCore) -> EngineCoreReady:
    """What the front end needs to know once the core has loaded."""
    limits = core.limits
    return EngineCoreReady(
        num_kv_blocks=limits.num_kv_blocks,
        block_size=limits.block_size,
        max_model_len=limits.max_model_len,
        eos_token_ids=list(limits.eos_token_ids),
    )


def run_core_loop(
    core: EngineCore,
    get_inputs: GetInputs,
    send: Callable[[EngineCoreOutputs], None],
    keep_going: Callable[[], bool],
) -> None:
    """Apply pending inputs, step while there is work, else block on input; until shutdown."""
    while True:
        busy = core.has_unfinished_requests()
        messages = get_inputs(0.0 if busy else IDLE_POLL_S)
        for msg in messages:
            if isinstance(msg, EngineCoreShutdown):
                logger.info("engine core shutting down")
                return
            if isinstance(msg, EngineCoreRequest):
                core.add_request(msg)
            elif isinstance(msg, EngineCoreFinish):
                core.finish_requests(msg)
        if core.has_unfinished_requests():
            send(core.step())
        elif messages:
            # an abort while idle frees blocks with no step to report it: send the new load
            send(core.make_outputs())
        elif not keep_going():
            logger.warning("engine core's owner is gone; exiting")
            return


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    """Process entry point: load, send EngineCoreReady, then serve the core loop over zmq."""
    setproctitle.setproctitle(PROCESS_TITLE)
    # Ctrl-C reaches the whole process group; the front end decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format=f"%(asctime)s {PROCESS_TITLE} %(levelname)s %(message)s"
        )
    ctx = zmq.Context()
    inputs = ctx.socket(zmq.PULL)
    outputs = ctx.socket(zmq.PUSH)
    for sock in (inputs, outputs):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a slow front end
        sock.setsockopt(zmq.RCVHWM, 0)
    inputs.bind(input_addr)
    outputs.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(CoreInput)
    parent = multiprocessing.parent_process()

    def get_inputs(timeout: float) -> list[CoreInput]:
        if not inputs.poll(int(timeout * 1000)):
            return []
        messages = [decoder.decode(inputs.recv())]
        while inputs.poll(0):
            messages.append(decoder.decode(inputs.recv()))
        return messages

    try:
        core = build_engine_core(config)
        outputs.send(encoder.encode(ready_message(core)))
        run_core_loop(
            core,
            get_inputs,
            lambda out: outputs.send(encoder.encode(out)),
            lambda: parent is None or parent.is_alive(),
        )
    except Exception:
        logger.exception("engine core failed; exiting so the front end restarts it")
        raise
    finally:
        inputs.close()
        outputs.close()
        ctx.term()
