"""The bundled SmolLM2-135M-Instruct through the engine: real answers, and the same invariants."""

from __future__ import annotations

from pathlib import Path

import pytest

from surge import LLM, EngineConfig, SamplingParams
from surge.engine.engine import LLMEngine
from surge.engine.messages import EngineCoreRequest
from surge.kernels import load_cpu_kernels
from tests.engine.test_invariants import mixed_workload, run_alone, run_batch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workload(default_model_path: Path):
    llm = LLM(str(default_model_path), dtype="float32", enable_prefix_caching=False)
    prompts, params = mixed_workload(llm.engine.core.runner.vocab_size, num=64, seed=1)
    for p in params:
        p.max_tokens = min(p.max_tokens, 12)
    return prompts, params, run_alone(llm, prompts, params)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_num_batched_tokens": 64, "enable_prefix_caching": False},
        {"num_kv_blocks": 40, "block_size": 16},
    ],
    ids=["default", "chunked-no-prefix-cache", "preemption"],
)
def test_smollm2_batch_of_64_matches_alone(
    default_model_path: Path, workload, options: dict
) -> None:
    prompts, params, expected = workload
    llm = LLM(str(default_model_path), dtype="float32", **options)
    assert run_batch(llm, prompts, params) == expected
    if "num_kv_blocks" in options:
        assert llm.engine.core.scheduler.num_preemptions_total > 0


def test_smollm2_bfloat16_batch_matches_alone_on_the_cpu_kernels(default_model_path: Path) -> None:
    """bf16 on the kernels' own linear: rows never meet, so a batch of 64 gives the same tokens.

    The step budget fits every prompt whole: a prompt split over steps (chunked prefill) goes
    through torch's attention in pieces, whose rounding depends on the piece's shape.
    """
    kernels = load_cpu_kernels()
    if kernels is None or not kernels.has_linear:
        pytest.skip("no AVX-512 BF16: bf16 linears run on oneDNN, which is not batch-invariant")
    # the GGUF dequantized to bf16: the bf16 linear (AMX or AVX-512 BF16, one per process);
    # the quantized kernel's case is in tests/models/test_quantized.py
    whole = {"dtype": "bfloat16", "max_num_batched_tokens": 16384, "quantization": "none"}
    llm = LLM(str(default_model_path), enable_prefix_caching=False, **whole)
    prompts, params = mixed_workload(llm.engine.core.runner.vocab_size, num=64, seed=2)
    for p in params:
        p.max_tokens = min(p.max_tokens, 12)
    expected = run_alone(llm, prompts, params)
    assert run_batch(llm, prompts, params) == expected
    cached = LLM(str(default_model_path), **whole)  # prefix caching on
    assert run_batch(cached, prompts, params) == expected
    # preempted sequences recompute their generated tokens' rows with the decode kernel
    tight = LLM(str(default_model_path), num_kv_blocks=40, **whole)
    assert run_batch(tight, prompts, params) == expected
    assert tight.engine.core.scheduler.num_preemptions_total > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_knows_the_capital_of_france(default_model_path: Path, dtype: str) -> None:
    # the GGUF's weights dequantized: on a CPU without native bf16, auto would keep them Q4_1 in
    # the float32 model, whose first token here is a near tie (tests/models/test_quantized.py
    # asks the quantized kernels for Tokyo, and gates their perplexity)
    llm = LLM(str(default_model_path), dtype=dtype, quantization="none")
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=32),
    )[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in {"stop", "length"}


def test_default_model_is_used_when_none_given() -> None:
    llm = LLM(None, num_kv_blocks=64)
    out = llm.chat(
        [{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0.0, max_tokens=8)
    )[0]
    assert out.outputs[0].text.strip()


def test_smollm2_bfloat16_resumed_sequences_continue_exactly(default_model_path: Path) -> None:
    """Sequences resumed with the tokens they already produced (failover to another replica, or
    recompute after preemption) go on with the same tokens in bf16 too: the rows of those
    tokens are attended to by the decode kernel, as they were when they were decoded."""
    kernels = load_cpu_kernels()
    if kernels is None or not kernels.has_linear:
        pytest.skip("no AVX-512 BF16: bf16 linears run on oneDNN, which is not batch-invariant")
    engine = LLMEngine(
        EngineConfig(
            model=str(default_model_path),
            dtype="bfloat16",
            quantization="none",
            max_num_batched_tokens=16384,
            enable_prefix_caching=False,
        )
    )
    topics = ["a lighthouse keeper", "the history of Paris", "how engines work", "a cat"]
    prompts = [
        engine.tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {t}."}])
        for t in topics
    ]
    params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    whole = run_core_batch(
        engine, [EngineCoreRequest(f"w{i}", p, params, 0.0) for i, p in enumerate(prompts)]
    )
    resumed = [
        EngineCoreRequest(f"r{i}-{k}", p, params, 0.0, output_token_ids=whole[f"w{i}"][:k])
        for i, p in enumerate(prompts)
        for k in (1, 30, 60, 95)
    ]
    got = run_core_batch(engine, resumed)
    for r in resumed:
        i, k = (int(x) for x in r.req_id[1:].split("-"))
        assert got[r.req_id] == whole[f"w{i}"][k:], f"prompt {i} resumed after {k} tokens"


def run_core_batch(engine: LLMEngine, requests: list[EngineCoreRequest]) -> dict[str, list[int]]:
    """Every token the core emits for each request, all run together to the end."""
    tokens: dict[str, list[int]] = {r.req_id: [] for r in requests}
    for r in requests:
        engine.core.add_request(r)
    while engine.core.has_unfinished_requests():
        for out in engine.core.step().outputs:
            assert out.error is None
            tokens[out.req_id].extend(out.new_token_ids)
    return tokens
