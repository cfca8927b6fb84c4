"""The C decode step (surge/kernels/decode_step.cpp) gives the Python path's bits exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surge import LLM, SamplingParams
from surge.engine.model_runner import ModelRunner
from surge.kernels import AVX512_BF16, load_cpu_kernels
from surge.models.attention import build_attention_metadata
from tests.tiny_models import make_tiny_model_dir

pytestmark = pytest.mark.skipif(load_cpu_kernels() is None, reason="no C++ compiler")
_NO_BF16_LINEAR = pytest.mark.skipif(
    load_cpu_kernels() is None or not load_cpu_kernels().has_linear,
    reason="packed bf16 linears need AVX-512 BF16 (the CPU has none: they run on oneDNN)",
)

# (architecture, --quantization, config overrides, SURGE_CPU_LINEAR, dtype): packed bf16 linears
# on the CPU's choice (AMX where it has it) and on AVX-512 BF16 (the choice of a CPU without AMX),
# q/k/v biases, GLM's interleaved partial rotary, and quantized weights (int8 as Q8_0, int4 as
# Q4_1), also in a float32 model (a CPU without native bf16)
_GLM = {"head_dim": 16, "partial_rotary_factor": 0.5, "pad_token_id": 0}
CASES = [
    pytest.param("llama", "none", {}, "auto", "bfloat16", marks=_NO_BF16_LINEAR),
    pytest.param("llama", "none", {}, "avx512", "bfloat16", marks=_NO_BF16_LINEAR),
    pytest.param("qwen2", "none", {}, "avx512", "bfloat16", marks=_NO_BF16_LINEAR),
    pytest.param("glm", "none", _GLM, "auto", "bfloat16", marks=_NO_BF16_LINEAR),
    ("llama", "int8", {}, "auto", "bfloat16"),
    ("llama", "int4", {}, "auto", "bfloat16"),
    ("llama", "int4", {}, "auto", "float32"),
    ("qwen2", "int8", {}, "auto", "float32"),
    ("glm", "int4", {**_GLM, "head_dim": 64}, "auto", "float32"),
]


def _runner(
    tmp_path: Path, arch: str, quantization: str, overrides: dict, dtype: str = "bfloat16"
) -> LLM:
    path = make_tiny_model_dir(tmp_path / arch, arch, seed=5, **overrides)
    return LLM(str(path), dtype=dtype, quantization=quantization, num_kv_blocks=64)


def _prefill(runner: ModelRunner, prompts: list[list[int]]) -> list[list[int]]:
    """Prefill each prompt into its own blocks (Python path); returns the block tables."""
    size = runner.config.block_size
    tables, next_block = [], 1
    for prompt in prompts:
        blocks = -(-(len(prompt) + 1) // size)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    lens = [len(p) for p in prompts]
    meta = build_attention_metadata(lens, lens, tables, size, rows_by_decode_kernel=True)
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.tensor([i for p in prompts for i in range(len(p))])
    runner.model(ids, pos, runner.kv_caches, meta)
    return tables


@pytest.mark.parametrize(("arch", "quantization", "overrides", "linear", "dtype"), CASES)
def test_a_decode_step_in_c_equals_the_python_layers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    arch: str,
    quantization: str,
    overrides: dict,
    linear: str,
    dtype: str,
):
    monkeypatch.setenv("SURGE_CPU_LINEAR", linear)
    load_cpu_kernels.cache_clear()  # one library object per process: choose again, then forget
    request.addfinalizer(load_cpu_kernels.cache_clear)
    runner = _runner(tmp_path, arch, quantization, overrides, dtype).engine.core.runner
    model = runner.model
    assert runner.dtype == getattr(torch, dtype)
    if linear == "avx512":
        assert model.model.layers[0].self_attn.o_proj.kernels.linear_isa == AVX512_BF16
    assert model.decode_step is not None, "the model should take the C decode step"
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 40)]  # contexts of 1, 2 and 3 blocks
    with torch.inference_mode():
        tables = _prefill(runner, prompts)
        lens = [len(p) + 1 for p in prompts]
        meta = build_attention_metadata([1, 1, 1], lens, tables, runner.config.block_size)
        ids, pos = torch.tensor([7, 8, 9]), torch.tensor([n - 1 for n in lens])
        in_c = model(ids, pos, runner.kv_caches, meta)
        caches_in_c = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        in_python = model.model.forward(ids, pos, runner.kv_caches, meta, decode_step=None)
        one_row = build_attention_metadata([1], lens[1:2], tables[1:2], runner.config.block_size)
        alone = model(ids[1:2], pos[1:2], runner.kv_caches, one_row)
    assert torch.equal(in_c, in_python)
    assert torch.equal(alone, in_c[1:2])  # a row's bits don't depend on its batch here either
    for (k_c, v_c), (k_py, v_py) in zip(caches_in_c, runner.kv_caches, strict=True):
        assert torch.equal(k_c, k_py) and torch.equal(v_c, v_py)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_greedy_generation_is_the_same_with_and_without_the_c_step(tmp_path: Path, dtype: str):
    llm = _runner(tmp_path, "llama", "int4", {}, dtype)
    model = llm.engine.core.runner.model
    step = model.decode_step
    assert step is not None
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    prompts = [[5, 6, 7, 8], list(range(10, 50)), [9] * 70]

    def run() -> list[tuple[list[int], object]]:
        return [
            (o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)
        ]

    in_c = run()
    model.decode_step = None
    in_python = run()
    model.decode_step = step
    assert in_c == in_python


def test_models_the_c_step_cannot_run_say_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    qwen3 = make_tiny_model_dir(tmp_path / "qwen3", "qwen3", seed=1, head_dim=16)
    assert (
        LLM(str(qwen3), dtype="bfloat16", num_kv_blocks=16).engine.core.runner.model.decode_step
        is None
    )
    runner = _runner(tmp_path, "llama", "none", {}).engine.core.runner
    assert runner.model.prepare_decode_step(None, runner.kv_caches) == "CPU kernels off"
    plain = _runner(tmp_path, "llama", "none", {}, "float32").engine.core.runner
    assert (
        plain.model.prepare_decode_step(load_cpu_kernels(), plain.kv_caches)
        == "a linear on oneDNN or torch, or of over 4 quantized formats"
    )
    monkeypatch.setenv("SURGE_DECODE_STEP", "0")
    kernels = load_cpu_kernels()
    assert runner.model.prepare_decode_step(kernels, runner.kv_caches) == "SURGE_DECODE_STEP=0"
    assert runner.model.decode_step is None
