"""Put a plan together: model source + device + settings -> every number and a plain answer."""

from __future__ import annotations

from dataclasses import dataclass

from surge.models.llama import head_dim_of
from surge.plan.arch import ModelSource
from surge.plan.devices import Device, DeviceKind
from surge.plan.estimate import (
    Capacity,
    KVShape,
    PlanSettings,
    SpeedBound,
    capacity,
    decode_bound,
    max_context_for,
)
from surge.plan.weights import WeightsEstimate, gguf_weights, hf_weights
from surge.router.memory import format_bytes


@dataclass(frozen=True)
class Plan:
    """Everything `surge plan` reports."""

    model: str
    architecture: str
    device: Device
    dtype: str
    quantization: str  # what the engine would do with the weights
    memory_bytes: int
    context_len: int
    max_model_len: int
    num_params: int
    shape: KVShape
    capacity: Capacity
    batch1: SpeedBound
    saturated: SpeedBound | None  # at max_concurrent_seqs; None when nothing fits
    users: int | None
    users_bound: SpeedBound | None  # at `users` sequences, when they fit
    fits: bool  # the answer to "can `users` users chat" (or: does anything fit)
    answer: str
    serve_flags: str  # the `surge serve` flags that realise this plan
    notes: tuple[str, ...]


def resolve_dtype(dtype: str, device: Device) -> str:
    """The engine's "auto": bf16 where the device runs it natively, else fp16 (GPU) / fp32 (CPU)."""
    if dtype != "auto":
        return dtype
    if device.bf16:
        return "bfloat16"
    return "float16" if device.kind is DeviceKind.GPU else "float32"


def check_quantization(quantization: str, source: ModelSource, device: Device, dtype: str) -> None:
    """Refuse what the engine refuses (loader.resolve_quantization), before planning it."""
    if quantization in ("auto", "none"):
        return
    if quantization == "gguf" and source.gguf_path is None:
        raise ValueError("--quantization gguf: the model is not a GGUF file (int8 or int4 are)")
    if quantization != "gguf" and source.gguf_path is not None:
        raise ValueError(f"--quantization {quantization}: a GGUF is quantized already")
    if device.kind is not DeviceKind.CPU or dtype != "bfloat16":
        raise ValueError(
            f"--quantization {quantization}: surge's quantized kernels run on CPU in bfloat16 "
            f"only (here: {device.kind.value}, {dtype}); plan with --quantization none"
        )


def model_weights(
    source: ModelSource, device: Device, dtype: str, quantization: str
) -> WeightsEstimate:
    """The weights as the engine would hold them on this device."""
    on_cpu = device.kind is DeviceKind.CPU
    if source.gguf_path is not None:
        return gguf_weights(source.gguf_path, dtype, quantization, cpu_kernels=on_cpu)
    method = quantization if quantization in ("int8", "int4") else "none"
    return hf_weights(source.hf_config, dtype, method, packed_cpu=on_cpu and dtype == "bfloat16")


def kv_shape(source: ModelSource) -> KVShape:
    """Layers, KV heads and head size as the engine's model classes read them."""
    c = source.hf_config
    heads = int(c.num_attention_heads)
    return KVShape(
        num_layers=int(c.num_hidden_layers),
        num_kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim_of(c)),
        num_heads=heads,
    )


def make_plan(
    source: ModelSource, device: Device, dtype: str, quantization: str, s: PlanSettings
) -> Plan:
    """Size weights and KV cache, bound the decode speed, answer the users question."""
    dtype = resolve_dtype(dtype, device)
    check_quantization(quantization, source, device, dtype)
    if s.context_len > source.max_model_len:
        raise ValueError(
            f"--context {s.context_len} is past the model's context length {source.max_model_len}"
        )
    weights = model_weights(source, device, dtype, quantization)
    shape = kv_shape(source)
    cap = capacity(shape, weights, s)

    def bound(batch: int) -> SpeedBound:
        return decode_bound(batch, s.context_len, shape, weights, cap.kv_bytes_per_token, device)

    users_fit = s.users is not None and 0 < s.users <= cap.max_concurrent_seqs
    fits, answer = _answer(cap, s, bound(s.users) if users_fit else None, s.users)
    return Plan(
        model=source.name,
        architecture=source.architecture,
        device=device,
        dtype=dtype,
        quantization=weights.quantization,
        memory_bytes=s.memory_bytes,
        context_len=s.context_len,
        max_model_len=source.max_model_len,
        num_params=weights.num_params,
        shape=shape,
        capacity=cap,
        batch1=bound(1),
        saturated=bound(cap.max_concurrent_seqs) if cap.max_concurrent_seqs else None,
        users=s.users,
        users_bound=bound(s.users) if users_fit and s.users else None,
        fits=fits,
        answer=answer,
        serve_flags=_serve_flags(cap, s, device, dtype, quantization),
        notes=source.notes + _device_notes(device),
    )


def _answer(
    cap: Capacity, s: PlanSettings, at_users: SpeedBound | None, users: int | None
) -> tuple[bool, str]:
    """Yes or no, and why, in one or two sentences."""
    free = s.memory_bytes - cap.reserve_bytes
    if s.kv_cache_memory is not None and cap.weights_bytes + cap.kv_cache_memory > s.memory_bytes:
        return False, (
            f"No: weights ({format_bytes(cap.weights_bytes)}) and KV cache "
            f"({format_bytes(cap.kv_cache_memory)}) take more than {format_bytes(s.memory_bytes)}."
        )
    if cap.num_kv_blocks == 0 or cap.max_seqs_by_kv == 0:
        if cap.weights_bytes >= free and s.kv_cache_memory is None:
            return False, (
                f"No: the weights alone take {format_bytes(cap.weights_bytes)} of the "
                f"{format_bytes(free)} left after the {format_bytes(cap.reserve_bytes)} reserve."
            )
        return False, (
            f"No: the KV cache ({format_bytes(cap.kv_cache_memory)}) can't hold one sequence of "
            f"{s.context_len} tokens ({format_bytes(cap.blocks_per_seq * cap.kv_bytes_per_block)})."
        )
    if users is None:
        return True, (
            f"Up to {cap.max_concurrent_seqs} users at once, each holding {s.context_len} tokens."
        )
    if users > cap.max_concurrent_seqs:
        limit = "the KV cache" if cap.max_seqs_by_kv < users else "--max-num-seqs"
        longest = max_context_for(users, cap, s.block_size)
        return False, (
            f"No: {limit} holds {cap.max_concurrent_seqs} sequences of {s.context_len} tokens, "
            f"not {users} (need {format_bytes(users * cap.blocks_per_seq * cap.kv_bytes_per_block)}"
            f" of KV cache, have {format_bytes(cap.kv_cache_bytes)}); {users} users fit with "
            f"contexts up to {longest} tokens each."
        )
    assert at_users is not None
    speed = at_users.per_sequence_tokens_per_s
    if speed < s.min_tokens_per_s:
        return False, (
            f"Not at {s.min_tokens_per_s:g} tokens/s each: {users} users fit in memory, but "
            f"decoding is bounded to {speed:.1f} tokens/s each by {at_users.limited_by}."
        )
    return True, (
        f"Yes: {users} users fit (up to {cap.max_concurrent_seqs} sequences of {s.context_len} "
        f"tokens), at most {speed:.0f} tokens/s each ({at_users.tokens_per_s:.0f} in all) "
        f"by {at_users.limited_by}; an upper bound, expect less."
    )


def _serve_flags(
    cap: Capacity, s: PlanSettings, device: Device, dtype: str, quantization: str
) -> str:
    """The `surge serve` flags that give the engine this plan's KV cache and context."""
    flags = [
        f"--kv-cache-memory {_size_flag(cap.kv_cache_memory)}",
        f"--max-model-len {s.context_len}",
        f"--dtype {dtype}",
    ]
    if device.kind is DeviceKind.GPU:
        flags.append("--device cuda")
    if quantization not in ("auto", "none"):
        flags.append(f"--quantization {quantization}")
    return " ".join(flags)


def _size_flag(num_bytes: int) -> str:
    """Exact and readable: whole MiB when it is whole MiB (a derived budget always is)."""
    return f"{num_bytes // 2**20}MiB" if num_bytes % 2**20 == 0 else str(num_bytes)


def _device_notes(device: Device) -> tuple[str, ...]:
    if device.kind is DeviceKind.GPU:
        return (
            "surge's CUDA path is the torch SDPA reference path, not yet tuned on a GPU: "
            "the bounds are the hardware's, not surge's",
        )
    return ()
