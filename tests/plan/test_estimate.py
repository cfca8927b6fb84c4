"""The plan's arithmetic: memory split, capacity, speed bounds, the answer."""

from __future__ import annotations

import pytest

from surge.plan.arch import load_source
from surge.plan.devices import get_device
from surge.plan.estimate import (
    KVShape,
    PlanSettings,
    capacity,
    decode_bound,
    default_reserve,
    max_context_for,
)
from surge.plan.planner import Plan, make_plan
from surge.plan.weights import WeightsEstimate
from tests.plan.conftest import CONFIGS

GiB = 2**30
SHAPE = KVShape(num_layers=2, num_kv_heads=2, head_dim=64, num_heads=4)
WEIGHTS = WeightsEstimate(
    num_params=10**6,
    weights_bytes=GiB,
    streamed_bytes=GiB,
    matmul_params=10**6,
    quantization="none",
)


def _settings(**kw: object) -> PlanSettings:
    base: dict[str, object] = dict(
        memory_bytes=4 * GiB, context_len=1000, dtype_bytes=2, block_size=16, max_num_seqs=256
    )
    base.update(kw)
    return PlanSettings(**base)  # type: ignore[arg-type]


def test_reserve() -> None:
    assert default_reserve(4 * GiB) == GiB  # the 1 GiB floor
    assert default_reserve(80 * GiB) == 8 * GiB
    assert default_reserve(GiB // 2) == GiB // 2  # never more than there is


def test_capacity_splits_memory_and_counts_whole_blocks() -> None:
    cap = capacity(SHAPE, WEIGHTS, _settings())
    assert cap.kv_cache_memory == 2 * GiB  # 4 - 1 weights - 1 reserve
    assert cap.kv_bytes_per_token == 2 * 2 * 2 * 64 * 2
    assert cap.kv_bytes_per_block == 16 * cap.kv_bytes_per_token
    assert cap.num_kv_blocks == 2 * GiB // cap.kv_bytes_per_block
    assert cap.blocks_per_seq == 63  # ceil(1000 / 16)
    assert cap.max_seqs_by_kv == cap.num_kv_blocks // 63
    assert cap.max_concurrent_seqs == min(cap.max_seqs_by_kv, 256)
    assert max_context_for(10, cap, 16) == cap.num_kv_blocks // 10 * 16


def test_derived_budget_is_whole_mib() -> None:
    cap = capacity(SHAPE, WEIGHTS, _settings(memory_bytes=4 * GiB + 12345))
    assert cap.kv_cache_memory % 2**20 == 0


def test_batch1_bound_is_bandwidth_over_bytes_read() -> None:
    device = get_device("rtx3090")
    b = decode_bound(1, 1000, SHAPE, WEIGHTS, 1024, device)
    assert b.limited_by == "bandwidth"
    assert b.tokens_per_s == pytest.approx(device.bandwidth / (GiB + 1000 * 1024))


def test_large_batches_become_compute_bound_and_never_exceed_it() -> None:
    device = get_device("cpu")
    heavy = WeightsEstimate(10**9, 2 * 10**9, 2 * 10**9, 10**9, "none")
    b = decode_bound(512, 16, SHAPE, heavy, 1024, device)
    assert b.limited_by == "compute"
    assert b.tokens_per_s <= device.flops / (2 * heavy.matmul_params)
    speeds = [decode_bound(n, 16, SHAPE, heavy, 1024, device).tokens_per_s for n in (1, 8, 64)]
    assert speeds == sorted(speeds)


def _glm(device: str, **kw: object) -> Plan:
    source = load_source(str(CONFIGS / "glm-4-9b-chat.json"))
    dev = get_device(device)
    quantization = str(kw.pop("quantization", "none"))
    settings = _settings(memory_bytes=dev.memory_bytes or 64 * GiB, **kw)
    return make_plan(source, dev, "auto", quantization, settings)


def test_glm4_on_rtx3090_the_issue_case() -> None:
    """GLM-4-9B in bf16 on a 24 GB RTX 3090: 17.5 GiB of weights, 40 KiB of KV per token."""
    plan = _glm("rtx3090", context_len=4096, users=8)
    assert plan.capacity.weights_bytes == 2 * 9_399_951_360
    assert plan.capacity.kv_bytes_per_token == 40 * 1024
    assert plan.fits and plan.answer.startswith("Yes")
    long = _glm("rtx3090", context_len=32768, users=8)
    assert not long.fits and "holds 3 sequences" in long.answer


def test_weights_that_do_not_fit() -> None:
    plan = _glm("t4", context_len=4096, users=1)  # 18.8 GB of fp16 weights in 15 GiB
    assert plan.dtype == "float16" and not plan.fits
    assert plan.answer.startswith("No: the weights alone")


def test_too_slow_for_the_users() -> None:
    plan = _glm("cpu", context_len=4096, users=8)
    assert plan.capacity.max_concurrent_seqs >= 8 and not plan.fits
    assert plan.answer.startswith("Not at 10 tokens/s")


def test_explicit_kv_budget_past_memory() -> None:
    plan = _glm("rtx3090", context_len=4096, kv_cache_memory=10 * GiB)
    assert not plan.fits and "take more than" in plan.answer


def test_int4_on_cpu_and_refused_on_gpu() -> None:
    bf16 = _glm("cpu", context_len=4096)
    int4 = _glm("cpu", context_len=4096, quantization="int4")
    assert int4.quantization == "int4"
    assert int4.capacity.weights_bytes < 0.4 * bf16.capacity.weights_bytes
    with pytest.raises(ValueError, match="CPU in bfloat16 only"):
        _glm("rtx3090", context_len=4096, quantization="int4")


def test_context_past_the_model() -> None:
    with pytest.raises(ValueError, match="past the model's context length"):
        _glm("h200", context_len=200_000)
