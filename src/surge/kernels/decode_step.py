"""A Llama-family model's decode-only step in one C call (decode_step.cpp): the structs it reads,
mirrored in ctypes, and the call.

The Python model makes ~10 kernel calls a layer, each a few microseconds of argument marshalling;
at batch 1 that is a large share of the step. A step whose sequences each add one token comes
here instead, running the same kernels in the same order, so its results are bit-identical.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from surge.models.attention import AttentionMetadata

MAX_SEGMENTS = 4  # kMaxSegments: quantized segments of different formats in one linear
PACKED_AVX512, PACKED_AMX, QUANTIZED = 0, 1, 2  # LinearKind

_I32, _I64, _F, _P = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class SurgeLinear(ctypes.Structure):
    """One linear: a packed bf16 weight, or quantized segments each filling its own columns."""

    _fields_ = [
        ("kind", _I32),
        ("num_segments", _I32),
        ("in_features", _I64),
        ("out_features", _I64),
        ("weight", _P),
        ("bias", _P),
        ("segment_weight", _P * MAX_SEGMENTS),
        ("segment_first", _I64 * MAX_SEGMENTS),
        ("segment_rows", _I64 * MAX_SEGMENTS),
        ("segment_qtype", _I32 * MAX_SEGMENTS),
    ]


class SurgeLayer(ctypes.Structure):
    """One decoder layer's norms, linears and KV cache."""

    _fields_ = [
        ("input_norm", _P),
        ("post_attention_norm", _P),
        ("qkv", SurgeLinear),
        ("o", SurgeLinear),
        ("gate_up", SurgeLinear),
        ("down", SurgeLinear),
        ("k_cache", _P),
        ("v_cache", _P),
    ]


class SurgeDecoder(ctypes.Structure):
    """The decoder's shapes, its layers and its final norm."""

    _fields_ = [
        ("num_layers", _I64),
        ("hidden", _I64),
        ("intermediate", _I64),
        ("num_heads", _I64),
        ("num_kv_heads", _I64),
        ("head_dim", _I64),
        ("rotary_dim", _I64),
        ("interleaved", _I32),
        ("eps", _F),
        ("scale", _F),
        ("layers", ctypes.POINTER(SurgeLayer)),
        ("final_norm", _P),
    ]


SIGNATURE = [ctypes.POINTER(SurgeDecoder), _P, _P, _P, _P, _P, _P, _I64, _I64, _I64]


@dataclass(frozen=True, slots=True)
class DecodeShape:
    """The decoder's sizes and attention constants."""

    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    interleaved: bool
    eps: float
    scale: float


def linear_struct(
    kind: int,
    in_features: int,
    out_features: int,
    bias: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    segments: Sequence[tuple[int, int, int, torch.Tensor]] = (),
) -> SurgeLinear:
    """A linear for the C step: kind PACKED_* with its packed bf16 weight, or QUANTIZED with
    segments (first column, rows, GGUF type, data)."""
    if len(segments) > MAX_SEGMENTS:
        raise ValueError(f"at most {MAX_SEGMENTS} quantized segments, not {len(segments)}")
    s = SurgeLinear(kind, len(segments), in_features, out_features)
    s.weight = None if weight is None else weight.data_ptr()
    s.bias = None if bias is None else bias.data_ptr()
    for i, (first, rows, qtype, data) in enumerate(segments):
        s.segment_weight[i] = data.data_ptr()
        s.segment_first[i] = first
        s.segment_rows[i] = rows
        s.segment_qtype[i] = qtype
    return s


class DecodeStep:
    """Runs a decode-only step of one model in C; holds every tensor its structs point into."""

    def __init__(
        self,
        fn: ctypes._CFuncPtr,
        shape: DecodeShape,
        layers: list[SurgeLayer],
        final_norm: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        keep: list[object],
    ) -> None:
        self._fn = fn
        self._layers = (SurgeLayer * len(layers))(*layers)
        self._decoder = SurgeDecoder(
            len(layers),
            shape.hidden,
            shape.intermediate,
            shape.num_heads,
            shape.num_kv_heads,
            shape.head_dim,
            shape.rotary_dim,
            int(shape.interleaved),
            shape.eps,
            shape.scale,
            ctypes.cast(self._layers, ctypes.POINTER(SurgeLayer)),
            final_norm.data_ptr(),
        )
        self._decoder_ref = ctypes.byref(self._decoder)
        self.kv_caches = kv_caches  # the caches the layers' structs point into
        self._keep = keep  # the modules whose weights, norms and biases the structs point into
        self.hidden = shape.hidden
        self.dtype = final_norm.dtype  # the model's activations (bf16, or float32: all quantized)

    def __call__(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The final norm's output [S, hidden] for embedded tokens `hidden` (overwritten and
        returned); every row a decode. cos/sin float32 [S, 1, rotary_dim // 2]."""
        tables, lens = meta.decode_block_tables, meta.decode_context_lens
        if (
            tables is None
            or lens is None
            or hidden.dtype != self.dtype
            or not hidden.is_contiguous()
            or hidden.shape != (tables.shape[0], self.hidden)
        ):
            raise ValueError(
                f"the C decode step takes a decode-only step of contiguous {self.dtype} rows"
            )
        self._fn(
            self._decoder_ref,
            hidden.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            meta.slot_mapping.data_ptr(),
            tables.data_ptr(),
            lens.data_ptr(),
            tables.shape[0],
            tables.shape[1],
            meta.block_size,
        )
        return hidden
