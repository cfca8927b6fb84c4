"""The engine core's busy loop, and its process entry point behind zmq sockets."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable

import msgspec
import setproctitle
import zmq

from surge.config import EngineConfig
from surge.engine.core import EngineCore
from surge.engine.faults import FaultInjector, hang_forever
from surge.engine.messages import (
    CoreInput,
    EngineCoreFinish,
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequest,
    EngineCoreShutdown,
)
from surge.engine.placement import apply_cpu_affinity
from surge.models.loader import load_model_files
from surge.process import die_with_parent, freeze_loaded_objects, ignore_group_signals
from surge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PROCESS_TITLE = "surge::engine-core"
# How long an idle core blocks for input, and a busy one steps, between checks that its parent
# still lives.
IDLE_POLL_S = 1.0
# Queue bounds between the front end and the core (messages). The front end admits at most
# --max-num-seqs + --max-queue sequences, so input never nears this; the output side holds
# steps the front end has not read yet: past it the core waits, which is back-pressure, not loss.
INPUT_HWM = 100_000
OUTPUT_HWM = 10_000

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
        vocab_size=limits.vocab_size or 0,
    )


def run_core_loop(
    core: EngineCore,
    get_inputs: GetInputs,
    send: Callable[[EngineCoreOutputs], None],
    keep_going: Callable[[], bool],
    faults: FaultInjector | None = None,
    send_raw: Callable[[bytes], None] | None = None,
) -> None:
    """Apply pending inputs, step while there is work, else block on input; until shutdown."""
    faults = faults or FaultInjector()
    next_check = time.monotonic() + IDLE_POLL_S
    while True:
        busy = core.has_unfinished_requests()
        messages = get_inputs(0.0 if busy else IDLE_POLL_S)
        for msg in messages:
            if isinstance(msg, EngineCoreShutdown):
                logger.info("engine core shutting down")
                return
            if isinstance(msg, EngineCoreRequest):
                faults.on_request(msg.prompt_token_ids)
                core.add_request(msg)
            elif isinstance(msg, EngineCoreFinish):
                core.finish_requests(msg)
        _inject(faults.take(), send_raw)
        if core.has_unfinished_requests():
            send(core.step())
        elif messages:
            # an abort while idle frees blocks with no step to report it: send the new load
            send(core.make_outputs())
        now = time.monotonic()
        if now >= next_check:  # idle or busy, at most once a period
            next_check = now + IDLE_POLL_S
            if not keep_going():
                logger.warning("engine core's owner is gone; exiting")
                return


def _inject(fault: str | None, send_raw: Callable[[bytes], None] | None) -> None:
    """Carry out a triggered test fault (see surge.engine.faults)."""
    if fault == "hang":
        hang_forever()
    elif fault == "crash":
        os._exit(17)
    elif fault == "garbage" and send_raw is not None:
        send_raw(b"\xc1 not msgpack")


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    """Process entry point: load, send EngineCoreReady, then serve the core loop over zmq."""
    setproctitle.setproctitle(PROCESS_TITLE)
    die_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():
        return  # the parent died before prctl took effect
    ignore_group_signals()
    apply_cpu_affinity(config)  # before torch starts its thread pool
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format=f"%(asctime)s {PROCESS_TITLE} %(levelname)s %(message)s"
        )
    ctx = zmq.Context()
    inputs = ctx.socket(zmq.PULL)
    outputs = ctx.socket(zmq.PUSH)
    for sock in (inputs, outputs):
        sock.setsockopt(zmq.LINGER, 0)
    inputs.setsockopt(zmq.RCVHWM, INPUT_HWM)
    outputs.setsockopt(zmq.SNDHWM, OUTPUT_HWM)  # PUSH blocks past it: back-pressure, no loss
    inputs.bind(input_addr)
    outputs.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(CoreInput)

    def get_inputs(timeout: float) -> list[CoreInput]:
        if not inputs.poll(int(timeout * 1000)):
            return []
        messages = [decoder.decode(inputs.recv())]
        while inputs.poll(0):
            messages.append(decoder.decode(inputs.recv()))
        return messages

    try:
        core = build_engine_core(config)
        freeze_loaded_objects(collect=True)  # no full collection walks the model in a step
        outputs.send(encoder.encode(ready_message(core)))
        run_core_loop(
            core,
            get_inputs,
            lambda out: outputs.send(encoder.encode(out)),
            lambda: parent is None or parent.is_alive(),
            FaultInjector.from_env(),
            outputs.send,
        )
    except Exception:
        logger.exception("engine core failed; exiting so the front end restarts it")
        raise
    finally:
        inputs.close()
        outputs.close()
        ctx.term()
