"""A plan as a human-readable table or as JSON."""

from __future__ import annotations

import dataclasses
import json

from surge.plan.devices import DEVICES
from surge.plan.estimate import SpeedBound
from surge.plan.planner import Plan
from surge.plan.units import format_rate
from surge.router.memory import format_bytes


def to_json(plan: Plan) -> str:
    """Every number of the plan, machine-readable (sizes in bytes, speeds in tokens/s)."""
    data = dataclasses.asdict(plan)
    data["device"]["kind"] = plan.device.kind.value
    data["capacity"]["kv_cache_bytes"] = plan.capacity.kv_cache_bytes
    return json.dumps(data, indent=2)


def _speed(b: SpeedBound | None) -> str:
    if b is None:
        return "-"
    return (
        f"<= {b.tokens_per_s:,.1f} tok/s at batch {b.batch} "
        f"(<= {b.per_sequence_tokens_per_s:,.1f} each; {b.limited_by}-bound)"
    )


def to_text(plan: Plan) -> str:
    """The plan as aligned `name  value` rows, then the answer."""
    c, d = plan.capacity, plan.device
    rows = [
        ("model", f"{plan.model} ({plan.architecture}, {plan.num_params / 1e9:.2f}B params)"),
        ("device", f"{d.name}: {d.description}"),
        ("peaks", f"{format_rate(d.bandwidth, 'B')}, {format_rate(d.flops, 'FLOP')}"),
        ("dtype / weights", f"{plan.dtype} / quantization {plan.quantization}"),
        ("weights", format_bytes(c.weights_bytes)),
        ("reserve", f"{format_bytes(c.reserve_bytes)} (runtime, activations)"),
        ("KV cache", f"{format_bytes(c.kv_cache_memory)} of {format_bytes(plan.memory_bytes)}"),
        (
            "KV per token",
            f"{format_bytes(c.kv_bytes_per_token)} ({plan.shape.num_layers} layers x "
            f"{plan.shape.num_kv_heads} KV heads x {plan.shape.head_dim} x 2 (K,V))",
        ),
        (
            "KV blocks",
            f"{c.num_kv_blocks:,} blocks of {c.block_size} tokens = {c.kv_capacity_tokens:,} tokens",
        ),
        (
            "context",
            f"{plan.context_len:,} tokens ({c.blocks_per_seq} blocks; model max "
            f"{plan.max_model_len:,})",
        ),
        ("max sequences", f"{c.max_concurrent_seqs} at {plan.context_len:,} tokens each"),
        ("decode, batch 1", _speed(plan.batch1)),
        ("decode, saturated", _speed(plan.saturated)),
    ]
    if plan.users_bound is not None:
        rows.append((f"decode, {plan.users} users", _speed(plan.users_bound)))
    rows.append(("surge serve", plan.serve_flags))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += ["", plan.answer]
    lines += [f"note: {n}" for n in plan.notes]
    lines.append("note: speeds are upper bounds (roofline over the device's peak numbers)")
    return "\n".join(lines)


def devices_table() -> str:
    """The device table, one line each."""
    lines = []
    for d in DEVICES.values():
        memory = format_bytes(d.memory_bytes) if d.memory_bytes else "(--memory)"
        lines.append(
            f"{d.name:<10}  {memory:>10}  {format_rate(d.bandwidth, 'B'):>11}  "
            f"{format_rate(d.flops, 'FLOP'):>14}  {d.description}"
        )
    return "\n".join(lines)
