"""Layers shared by every architecture: RMSNorm, rotary embedding, fused linears, gated MLP.

Fused modules own the loaders that split HF checkpoints' separate q/k/v and gate/up tensors into
their fused weights. Loaders are methods of the module, not attributes set on parameters, so they
survive `to_empty` (which may replace Parameter objects).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from surge.kernels.decode_step import (
    MAX_SEGMENTS,
    PACKED_AMX,
    PACKED_AVX512,
    QUANTIZED,
    SurgeLinear,
    linear_struct,
)
from surge.models.quant import QuantizedTensor

if TYPE_CHECKING:
    from surge.kernels import CpuKernels

logger = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as transformers does.

    Called with a residual, it first adds x into the residual stream and returns
    (norm(residual + x), residual + x): one fused kernel on CPU, as vLLM's fused_add_rms_norm.
    """

    kernels: CpuKernels | None = None  # set by the model when the CPU kernels apply

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.kernels is not None and x.dim() == 2 and x.is_contiguous():
            out = self.kernels.rms_norm(x, self.weight, self.eps, residual)  # residual in place
            return out if residual is None else (out, residual)
        if residual is not None:
            residual = residual + x
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_parameters(hf_config: PretrainedConfig) -> dict:
    """The config's rope parameters in the transformers 5 shape (`rope_parameters`)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers 4.x: rope_theta + rope_scaling
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        if hasattr(hf_config, "partial_rotary_factor"):
            params.setdefault("partial_rotary_factor", hf_config.partial_rotary_factor)
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


class RotaryEmbedding(nn.Module):
    """Rotary position embedding; cos/sin are computed once per step from the positions.

    Supports HF's rope types through `ROPE_INIT_FUNCTIONS` (linear, llama3, yarn, ...) with
    frequencies fixed at load time: "dynamic" NTK scaling is not recomputed per length.
    `interleaved` rotates pairs (x0, x1), (x2, x3), ... (GLM); otherwise halves (Llama).
    """

    def __init__(
        self, hf_config: PretrainedConfig, head_dim: int, interleaved: bool = False
    ) -> None:
        super().__init__()
        self.hf_config = hf_config
        params = rope_parameters(hf_config)
        self.rope_type = params["rope_type"]
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.interleaved = interleaved
        self.attention_scaling = 1.0
        if "dynamic" in self.rope_type or self.rope_type == "longrope":
            logger.warning("rope_type %r: frequencies fixed at load time", self.rope_type)
        self.register_buffer("inv_freq", torch.empty(self.rotary_dim // 2), persistent=False)
        if self.inv_freq.device.type != "meta":
            self.reset_buffers()

    def reset_buffers(self) -> None:
        """Compute inv_freq in float32 on the buffer's device (after materialization or a cast)."""
        inv_freq, self.attention_scaling = self._inv_freq()
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> RotaryEmbedding:
        # `.to(bfloat16)` would round the frequencies and `to_empty` leaves garbage: recompute
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.reset_buffers()
        return self

    def _inv_freq(self) -> tuple[torch.Tensor, float]:
        if self.rope_type == "default":
            base = rope_parameters(self.hf_config)["rope_theta"]
            exps = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim
            return 1.0 / (base**exps), 1.0
        if self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.hf_config, torch.device("cpu"))
        return inv_freq.float().cpu(), float(scaling)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, rotary_dim // 2] in dtype, computed in float32 as transformers does."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        scale = self.attention_scaling
        return (freqs.cos() * scale).to(dtype)[:, None], (freqs.sin() * scale).to(dtype)[:, None]


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Rotate the first rotary_dim features of x [T, H, D]; the rest pass through."""
    rotary_dim = cos.shape[-1] * 2
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


class Linear(nn.Linear):
    """nn.Linear that can trade its weight for a pre-packed layout once loaded.

    On a CPU with AVX-512 BF16 and the CPU kernels on, bf16 weights go to surge's own blocked
    layout and kernel (`CpuKernels.linear`), on AMX tiles where the CPU has them (the process
    picks one implementation for good), with each row's result independent of the batch; see
    BENCHMARKS.md for the speed against oneDNN per CPU. Otherwise they go to oneDNN's pre-packed
    layout (~1.3x F.linear at batch 1), whose results are bit-identical to F.linear for every
    batch size.
    """

    packed_weight: torch.Tensor | None = None  # oneDNN's layout
    kernel_weight: torch.Tensor | None = None  # CpuKernels.pack_linear's layout
    # GGUF-quantized rows: (first output column, matrix), run by CpuKernels.qlinear
    quant_segments: list[tuple[int, QuantizedTensor]] | None = None
    kernels: CpuKernels | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_segments is not None:
            return self.kernels.qlinear(x, self.quant_segments, self.out_features, self.bias)
        if self.kernel_weight is not None:
            return self.kernels.linear(x, self.kernel_weight, self.out_features, self.bias)
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x, self.packed_weight, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)

    def forward_float(self, x: torch.Tensor) -> torch.Tensor:
        """The output in float32; the kernels' linear skips rounding it to bf16 (for logits)."""
        if self.quant_segments is not None:
            return self.kernels.qlinear(
                x, self.quant_segments, self.out_features, self.bias, out_dtype=torch.float32
            )
        if self.kernel_weight is not None:
            return self.kernels.linear(
                x, self.kernel_weight, self.out_features, self.bias, out_dtype=torch.float32
            )
        return self(x).float()

    def decode_struct(self) -> SurgeLinear | None:
        """This linear as the C decode step reads it; None where it runs on oneDNN or torch."""
        if self.kernels is None:
            return None
        if self.quant_segments is not None:
            segments = [(first, w.shape[0], w.qtype, w.data) for first, w in self.quant_segments]
            if len(segments) > MAX_SEGMENTS:
                return None
            return linear_struct(
                QUANTIZED, self.in_features, self.out_features, self.bias, segments=segments
            )
        if self.kernel_weight is None:
            return None
        amx = self.kernels.linear_uses_amx(self.in_features)
        kind = PACKED_AMX if amx else PACKED_AVX512
        return linear_struct(
            kind, self.in_features, self.out_features, self.bias, weight=self.kernel_weight
        )

    def load_quantized(self, weight: QuantizedTensor, first_column: int = 0) -> None:
        """Take a quantized matrix as output columns [first_column, + its rows) of the weight."""
        rows, cols = weight.shape
        if cols != self.in_features or first_column + rows > self.out_features:
            raise ValueError(
                f"shape mismatch: {weight.type_name} {tuple(weight.shape)} at column "
                f"{first_column} of a {self.out_features}x{self.in_features} linear"
            )
        self.quant_segments = [*(self.quant_segments or []), (first_column, weight)]

    def pack(self, kernels: CpuKernels | None = None) -> bool:
        """Pack the weight and drop the plain copy; False where packing doesn't apply."""
        if self.quant_segments is not None:
            return self._use_quantized(kernels)
        if not can_pack(self.weight):
            return False
        weight = self.weight.detach()
        if kernels is not None and kernels.can_linear(weight):
            self.kernel_weight = kernels.pack_linear(weight)
            self.kernels = kernels
        else:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.weight = None  # the packed copy replaces it: no second copy of the weights in memory
        return True

    def _use_quantized(self, kernels: CpuKernels | None) -> bool:
        if kernels is None:
            raise RuntimeError("quantized weights need surge's CPU kernels (SURGE_CPU_KERNELS)")
        segments = sorted(self.quant_segments, key=lambda s: s[0])
        covered = 0
        for first, weight in segments:
            if first != covered:
                raise ValueError(f"quantized linear: columns {covered}..{first} never loaded")
            covered += weight.shape[0]
        if covered != self.out_features:
            raise ValueError(f"quantized linear: {covered} of {self.out_features} columns loaded")
        self.quant_segments = _merge_segments(segments)
        self.kernels = kernels
        self.weight = None  # never filled: the quantized rows are the weight
        return True


def _merge_segments(
    segments: list[tuple[int, QuantizedTensor]],
) -> list[tuple[int, QuantizedTensor]]:
    """Neighbouring segments of one format joined into one (one kernel call for q, k and v)."""
    merged: list[tuple[int, QuantizedTensor]] = []
    for first, weight in segments:
        if merged and merged[-1][1].qtype == weight.qtype:
            start, prev = merged[-1]
            data = torch.cat([prev.data, weight.data])
            merged[-1] = (
                start,
                QuantizedTensor(
                    weight.qtype, data, (prev.shape[0] + weight.shape[0], prev.shape[1])
                ),
            )
        else:
            merged.append((first, weight))
    return merged


class Embedding(nn.Embedding):
    """nn.Embedding whose table may stay quantized (GGUF): rows are decoded as they are looked up."""

    quant: QuantizedTensor | None = None
    kernels: CpuKernels | None = None
    dtype: torch.dtype = torch.bfloat16  # of the rows a quantized table is decoded to

    def load_quantized(self, weight: QuantizedTensor) -> None:
        """Take the quantized [vocab, dim] table instead of the float one."""
        if weight.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"shape mismatch: expected {(self.num_embeddings, self.embedding_dim)}, "
                f"got {weight.type_name} {weight.shape}"
            )
        self.quant = weight

    def use_quantized(self, kernels: CpuKernels | None) -> bool:
        """Drop the float table where the quantized one is loaded; False if there is none."""
        if self.quant is None:
            return False
        if kernels is None:
            raise RuntimeError("quantized weights need surge's CPU kernels (SURGE_CPU_KERNELS)")
        self.kernels = kernels
        self.dtype = self.weight.dtype  # the model's: the rows come out in it
        self.weight = None
        return True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.kernels.qembedding(ids, self.quant, self.dtype)
        return super().forward(ids)


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packing pays off for bf16 weights on a CPU with native bf16."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def pack_linears(model: nn.Module, kernels: CpuKernels | None = None) -> int:
    """Pack every Linear of a loaded model (for `kernels` where they apply); how many were."""
    return sum(m.pack(kernels) for m in model.modules() if isinstance(m, Linear))


class MergedLinear(Linear):
    """A linear whose output rows are several HF projections stacked; loads each by shard id."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size

    def load_hf(self, param_name: str, loaded: torch.Tensor, shard_id: str | None) -> None:
        """Copy one shard (or, with shard_id None, the already fused tensor) into the weight."""
        if isinstance(loaded, QuantizedTensor):
            if param_name != "weight":
                raise ValueError(f"a quantized {param_name} is not supported")
            self.load_quantized(loaded, 0 if shard_id is None else self.shard_offsets[shard_id][0])
            return
        param = getattr(self, param_name)
        if shard_id is None:
            copy_checked(param, loaded)
            return
        offset, size = self.shard_offsets[shard_id]
        copy_checked(param.narrow(0, offset, size), loaded)


class QKVLinear(MergedLinear):
    """Fused q/k/v projection: output is [q (H*D) | k (Hkv*D) | v (Hkv*D)]."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool):
        kv = num_kv_heads * head_dim
        super().__init__(hidden, {"q": num_heads * head_dim, "k": kv, "v": kv}, bias)
        self.split_sizes = [num_heads * head_dim, kv, kv]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused into one matmul."""

    kernels: CpuKernels | None = None  # set by the model when the CPU kernels apply

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden, {"gate": intermediate, "up": intermediate}, bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.is_silu = act == "silu"
        self.act = F.silu if self.is_silu else ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj.forward(x)
        if self.kernels is not None and self.is_silu and gate_up.dim() == 2:
            return self.down_proj.forward(self.kernels.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj.forward(self.act(gate) * up)


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy src into dst (casting dtype), refusing a shape mismatch."""
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch: expected {tuple(dst.shape)}, got {tuple(src.shape)}")
    with torch.no_grad():
        dst.copy_(src)


# (our module name, HF module name, shard id): HF checkpoints keep these projections separate
STACKED_PARAMS = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", "gate"),
    ("gate_up_proj", "up_proj", "up"),
)


def load_hf_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]],
    skip: Iterable[str] = (),
) -> None:
    """Load HF-named tensors into model, routing split projections to fused modules.

    Raises ValueError on an unknown name or a shape mismatch, and when a parameter is never
    (fully) loaded: uninitialized weights would otherwise give silent garbage.
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    skip = set(skip)
    loaded: dict[str, set[str | None]] = {}
    for hf_name, tensor in weights:
        if hf_name in skip or hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name, shard_id = _map_name(hf_name)
        if name not in params:
            raise ValueError(f"unknown weight {hf_name!r} for {type(model).__name__}")
        module_name, _, param_name = name.rpartition(".")
        module = modules[module_name]
        if isinstance(module, MergedLinear):
            module.load_hf(param_name, tensor, shard_id)
        elif isinstance(tensor, QuantizedTensor):
            if not isinstance(module, Linear | Embedding) or param_name != "weight":
                raise ValueError(f"{hf_name!r} cannot be loaded quantized")
            module.load_quantized(tensor)
        else:
            copy_checked(params[name], tensor)
        loaded.setdefault(name, set()).add(shard_id)
    missing = []
    for name in params:
        module = modules[name.rpartition(".")[0]]
        shards = loaded.get(name, set())
        expected = set(module.shard_offsets) if isinstance(module, MergedLinear) else {None}
        if None not in shards and not expected <= shards:
            missing.append(name)
    if missing:
        raise ValueError(
            f"weights missing from the checkpoint: {missing[:8]} ({len(missing)} in all)"
        )


def _map_name(hf_name: str) -> tuple[str, str | None]:
    for ours, theirs, shard_id in STACKED_PARAMS:
        if f".{theirs}." in hf_name:
            return hf_name.replace(f".{theirs}.", f".{ours}."), shard_id
    return hf_name, None
