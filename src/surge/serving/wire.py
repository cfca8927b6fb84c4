"""What travels between the front end and a remote engine host: msgpack bytes, so Ray (or any
transport) only carries opaque buffers and both ends agree on the engine's own message types."""

from __future__ import annotations

import msgspec

from surge.config import EngineLimits
from surge.engine.messages import EngineCoreOutputs, EngineCoreReady, EngineCoreRequest


class HostChunk(msgspec.Struct, frozen=True, array_like=True):
    """One step's outputs for one sequence, with the host's load as of that step."""

    host: str  # which host ran the step (its stats are kept per host)
    outputs: EngineCoreOutputs


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
_chunk_decoder = msgspec.msgpack.Decoder(HostChunk)
_ready_decoder = msgspec.msgpack.Decoder(EngineCoreReady)


def encode(msg: msgspec.Struct) -> bytes:
    """Any engine message (or HostChunk) as msgpack."""
    return _encoder.encode(msg)


def decode_request(data: bytes) -> EngineCoreRequest:
    """A sequence to run, as the front end sent it."""
    return _request_decoder.decode(data)


def decode_chunk(data: bytes) -> HostChunk:
    """One streamed step of a sequence."""
    return _chunk_decoder.decode(data)


def encode_limits(limits: EngineLimits) -> bytes:
    """A host's EngineLimits, as the core's own ready message."""
    return encode(
        EngineCoreReady(
            num_kv_blocks=limits.num_kv_blocks,
            block_size=limits.block_size,
            max_model_len=limits.max_model_len,
            eos_token_ids=list(limits.eos_token_ids),
            vocab_size=limits.vocab_size or 0,
        )
    )


def decode_limits(data: bytes) -> EngineLimits:
    """The EngineLimits a host reported."""
    msg = _ready_decoder.decode(data)
    return EngineLimits(
        num_kv_blocks=msg.num_kv_blocks,
        block_size=msg.block_size,
        max_model_len=msg.max_model_len,
        eos_token_ids=tuple(msg.eos_token_ids),
        vocab_size=msg.vocab_size or None,
    )
