"""The planner's KV capacity is exactly what the engine allocates for the same memory setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from surge.cli import parse_size as serve_parse_size
from surge.config import EngineConfig
from surge.engine.model_runner import ModelRunner
from surge.models.default_model import DEFAULT_MODEL_NAME
from surge.models.loader import load_model_files
from surge.plan.arch import _bundled_gguf, load_source
from surge.plan.devices import get_device
from surge.plan.estimate import PlanSettings
from surge.plan.planner import Plan, make_plan

_BYTES = {"float32": 4, "bfloat16": 2}


def _plan(
    model: str,
    dtype: str,
    kv_cache_memory: int | None,
    memory: int = 2**30,
    quantization: str = "none",
) -> Plan:
    settings = PlanSettings(
        memory_bytes=memory,
        context_len=256,
        dtype_bytes=_BYTES[dtype],
        block_size=16,
        max_num_seqs=256,
        kv_cache_memory=kv_cache_memory,
    )
    return make_plan(load_source(model), get_device("cpu"), dtype, quantization, settings)


def _engine_blocks(
    model: str, dtype: str, kv_cache_memory: int, quantization: str = "none"
) -> tuple[int, int]:
    """(blocks, bytes of the KV tensors) the model runner allocates."""
    config = EngineConfig(
        model=model,
        dtype=dtype,
        kv_cache_memory=kv_cache_memory,
        cpu_kernels=quantization == "gguf",  # quantized weights need them; else skip the build
        quantization=quantization,
    )
    runner = ModelRunner(config, load_model_files(model), eos_token_ids=(0,))
    allocated = sum(k.nbytes + v.nbytes for k, v in runner.kv_caches)
    return runner.limits.num_kv_blocks, allocated


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kv_cache_memory", [8192, 3 * 2**20 + 12345, 64 * 2**20])
def test_tiny_model_kv_capacity_is_exact(
    tiny_model_dir: Path, dtype: str, kv_cache_memory: int
) -> None:
    plan = _plan(str(tiny_model_dir), dtype, kv_cache_memory)
    blocks, allocated = _engine_blocks(str(tiny_model_dir), dtype, kv_cache_memory)
    assert plan.capacity.num_kv_blocks == blocks
    assert plan.capacity.kv_capacity_tokens == blocks * 16
    assert plan.capacity.kv_cache_bytes == allocated


def test_printed_serve_flag_gives_the_planned_blocks(tiny_model_dir: Path) -> None:
    """With no --kv-cache-memory, the plan's derived budget, as printed for `surge serve`,
    makes the engine allocate exactly the planned blocks."""
    plan = _plan(str(tiny_model_dir), "float32", None, memory=1536 * 2**20)
    flag = plan.serve_flags.split("--kv-cache-memory ")[1].split()[0]
    assert serve_parse_size(flag) == plan.capacity.kv_cache_memory
    blocks, _ = _engine_blocks(str(tiny_model_dir), "float32", serve_parse_size(flag))
    assert blocks == plan.capacity.num_kv_blocks


def test_too_little_memory_for_one_block(tiny_model_dir: Path) -> None:
    """Where the engine refuses to start (no whole block), the plan says no."""
    plan = _plan(str(tiny_model_dir), "float32", 100)
    assert plan.capacity.num_kv_blocks == 0 and not plan.fits
    with pytest.raises(ValueError, match="holds no KV block"):
        _engine_blocks(str(tiny_model_dir), "float32", 100)


@pytest.mark.slow
@pytest.mark.skipif(_bundled_gguf() is None, reason="the bundled model is not fetched")
def test_bundled_model_kv_capacity_is_exact() -> None:
    """The bundled chat model (its GGUF, as `surge serve` loads it), bf16, 96 MiB of KV; its
    weights stay Q4_1 (--quantization gguf) only so the load is quick: KV sizing ignores them."""
    kv = 96 * 2**20
    plan = _plan(DEFAULT_MODEL_NAME, "bfloat16", kv, quantization="gguf")
    blocks, allocated = _engine_blocks(str(_bundled_gguf()), "bfloat16", kv, "gguf")
    assert plan.capacity.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    assert (plan.capacity.num_kv_blocks, plan.capacity.kv_cache_bytes) == (blocks, allocated)
