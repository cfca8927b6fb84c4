"""Engine invariants: greedy output never depends on batching, caching, chunking or preemption."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from surge import LLM, SamplingParams


def mixed_workload(
    vocab: int, num: int = 64, seed: int = 0
) -> tuple[list[list[int]], list[SamplingParams]]:
    """Mixed prompt and output lengths; a third share a long prefix so prefix caching has hits."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(40)]
    prompts, params = [], []
    for i in range(num):
        tail = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 90))]
        prompts.append(shared + tail if i % 3 == 0 else tail)
        params.append(
            SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 40), ignore_eos=True)
        )
    return prompts, params


def run_alone(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    return [
        llm.generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params, strict=True)
    ]


def run_batch(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def reference(
    tiny_model_dir: Path,
) -> tuple[list[list[int]], list[SamplingParams], list[list[int]]]:
    """Each request of the workload run alone, no prefix caching, no chunking."""
    llm = LLM(str(tiny_model_dir), dtype="float32", enable_prefix_caching=False)
    prompts, params = mixed_workload(llm.engine.core.runner.vocab_size)
    return prompts, params, run_alone(llm, prompts, params)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"enable_prefix_caching": False},
        {"max_num_batched_tokens": 32},  # chunked prefill on every long prompt
        {"enable_chunked_prefill": False, "max_num_batched_tokens": 256},
        {"num_kv_blocks": 24, "block_size": 8},  # far too small for 64 requests: forced preemption
        {
            "num_kv_blocks": 24,
            "block_size": 8,
            "enable_prefix_caching": False,
            "max_num_batched_tokens": 24,
        },
    ],
    ids=[
        "default",
        "no-prefix-cache",
        "chunked-32",
        "no-chunking",
        "preemption",
        "preemption-chunked",
    ],
)
def test_batch_of_64_matches_alone(tiny_model_dir: Path, reference, options: dict) -> None:
    prompts, params, expected = reference
    llm = LLM(str(tiny_model_dir), dtype="float32", **options)
    got = run_batch(llm, prompts, params)
    assert [len(g) for g in got] == [sp.max_tokens for sp in params]
    assert got == expected
    sched = llm.engine.core.scheduler
    if "num_kv_blocks" in options:
        assert sched.num_preemptions_total > 0
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache_usage == 0.0


def test_prefix_cache_hits_are_reported(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), dtype="float32")
    prefix = list(range(10, 58))  # 3 full blocks of 16
    first = llm.generate([prefix + [70]], SamplingParams(temperature=0.0, max_tokens=2))[0]
    second = llm.generate([prefix + [71]], SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 48
