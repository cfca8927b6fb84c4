"""The numbers of a plan: memory split, KV capacity (the engine's own arithmetic), speed bounds.

Decode speed model (roofline): one decode step of B sequences, each holding C tokens, reads every
streamed weight once and each sequence's KV cache once, and does 2 FLOPs per weight per sequence
plus 4 * layers * heads * head_dim FLOPs per sequence per context token (QK^T and PV). A step
can't be faster than its bytes over the bandwidth, nor its FLOPs over the compute peak, so
B / max(bytes / bandwidth, flops / peak) bounds tokens/s from above.
"""

from __future__ import annotations

from dataclasses import dataclass

from surge.engine.kv_sizing import (
    blocks_for_tokens,
    kv_bytes_per_block,
    kv_bytes_per_token,
    num_blocks_for_memory,
)
from surge.plan.devices import Device
from surge.plan.weights import WeightsEstimate

MiB = 2**20
GiB = 2**30
# Memory kept back from the KV cache when --kv-cache-memory is not given: the CUDA context or the
# process, activations of a max_num_batched_tokens step, the allocator's slack. vLLM keeps 10% of
# a GPU (gpu_memory_utilization 0.9); at least 1 GiB on a small device.
RESERVE_FRACTION = 0.10
MIN_RESERVE_BYTES = 1 * GiB


@dataclass(frozen=True)
class KVShape:
    """What the KV cache's size depends on."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_heads: int  # query heads: attention FLOPs


@dataclass(frozen=True)
class PlanSettings:
    """The deployment being planned."""

    memory_bytes: int
    context_len: int  # tokens each sequence holds (prompt + reply)
    dtype_bytes: int  # KV cache and activation dtype (the engine's model dtype)
    block_size: int
    max_num_seqs: int
    kv_cache_memory: int | None = None  # the engine's setting; None = what the memory leaves
    reserve_bytes: int | None = None  # None = default_reserve(memory_bytes)
    users: int | None = None
    min_tokens_per_s: float = 10.0  # per user: faster than people read


@dataclass(frozen=True)
class SpeedBound:
    """Upper bound on decode speed at one batch size, and what bounds it."""

    batch: int
    tokens_per_s: float  # all sequences together
    per_sequence_tokens_per_s: float
    limited_by: str  # "bandwidth" or "compute"


@dataclass(frozen=True)
class Capacity:
    """The KV cache the engine would allocate and the sequences it holds."""

    weights_bytes: int
    reserve_bytes: int
    kv_cache_memory: int  # the budget given to the engine (--kv-cache-memory)
    kv_bytes_per_token: int
    kv_bytes_per_block: int
    block_size: int
    num_kv_blocks: int  # 0 when not even one block fits
    kv_capacity_tokens: int
    blocks_per_seq: int
    max_seqs_by_kv: int
    max_concurrent_seqs: int  # also capped by max_num_seqs

    @property
    def kv_cache_bytes(self) -> int:
        """What the engine's KV tensors take: whole blocks only."""
        return self.num_kv_blocks * self.kv_bytes_per_block


def default_reserve(memory_bytes: int) -> int:
    """Memory not given to weights or KV cache: 10%, at least 1 GiB (at most all of it)."""
    return min(memory_bytes, max(MIN_RESERVE_BYTES, int(memory_bytes * RESERVE_FRACTION)))


def capacity(shape: KVShape, weights: WeightsEstimate, s: PlanSettings) -> Capacity:
    """Split memory into weights, reserve and KV cache; count blocks as the model runner does."""
    reserve = s.reserve_bytes if s.reserve_bytes is not None else default_reserve(s.memory_bytes)
    budget = s.kv_cache_memory
    if budget is None:
        # whole MiB, so the `--kv-cache-memory` flag the plan prints gives exactly these blocks
        budget = max(0, s.memory_bytes - weights.weights_bytes - reserve) // MiB * MiB
    per_token = kv_bytes_per_token(
        shape.num_layers, shape.num_kv_heads, shape.head_dim, s.dtype_bytes
    )
    per_block = kv_bytes_per_block(
        shape.num_layers, shape.num_kv_heads, shape.head_dim, s.dtype_bytes, s.block_size
    )
    try:
        num_blocks = num_blocks_for_memory(budget, per_block)
    except ValueError:  # the engine would refuse to start; the plan says so
        num_blocks = 0
    blocks_per_seq = blocks_for_tokens(s.context_len, s.block_size)
    by_kv = num_blocks // blocks_per_seq
    return Capacity(
        weights_bytes=weights.weights_bytes,
        reserve_bytes=reserve,
        kv_cache_memory=budget,
        kv_bytes_per_token=per_token,
        kv_bytes_per_block=per_block,
        block_size=s.block_size,
        num_kv_blocks=num_blocks,
        kv_capacity_tokens=num_blocks * s.block_size,
        blocks_per_seq=blocks_per_seq,
        max_seqs_by_kv=by_kv,
        max_concurrent_seqs=min(by_kv, s.max_num_seqs),
    )


def decode_bound(
    batch: int,
    context_len: int,
    shape: KVShape,
    weights: WeightsEstimate,
    kv_per_token: int,
    device: Device,
) -> SpeedBound:
    """Roofline bound on decode tokens/s for `batch` sequences of `context_len` tokens each."""
    step_bytes = weights.streamed_bytes + batch * context_len * kv_per_token
    attn_flops = 4 * shape.num_layers * shape.num_heads * shape.head_dim * context_len
    step_flops = batch * (2 * weights.matmul_params + attn_flops)
    t_mem, t_compute = step_bytes / device.bandwidth, step_flops / device.flops
    step_s = max(t_mem, t_compute)
    return SpeedBound(
        batch=batch,
        tokens_per_s=batch / step_s,
        per_sequence_tokens_per_s=1 / step_s,
        limited_by="bandwidth" if t_mem >= t_compute else "compute",
    )


def max_context_for(num_users: int, cap: Capacity, block_size: int) -> int:
    """The longest context every one of `num_users` concurrent sequences can hold."""
    return (cap.num_kv_blocks // num_users) * block_size if num_users else 0
