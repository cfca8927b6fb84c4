"""A sequence resumed on another core (failover) with the tokens it already produced continues
exactly where it was: greedy, seeded sampling and penalties included. Tiny model, float32.

Also 2 in-process replicas of the tiny model: 300 short requests spread evenly (the cores' own
request counts), and prefix affinity raises the prefix-cache hit rate.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from surge import EngineConfig, SamplingParams
from surge.config import ReplicaConfig
from surge.engine.async_engine import AsyncEngine
from surge.engine.engine import LLMEngine
from surge.engine.messages import EngineCoreRequest

pytestmark = pytest.mark.timeout(300)

PROMPT = [5, 17, 99, 42, 8, 250, 31, 77, 12, 64, 3, 190]


def run_core(engine: LLMEngine, req: EngineCoreRequest) -> list[int]:
    """Every token the core emits for one request, run alone to the end."""
    engine.core.add_request(req)
    tokens: list[int] = []
    while engine.core.has_unfinished_requests():
        for out in engine.core.step().outputs:
            assert out.error is None
            tokens.extend(out.new_token_ids)
    return tokens


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        SamplingParams(
            temperature=1.0,
            top_p=0.9,
            seed=1234,
            max_tokens=24,
            ignore_eos=True,
            frequency_penalty=0.7,
        ),
        SamplingParams(
            temperature=0.8,
            top_k=20,
            seed=7,
            max_tokens=24,
            ignore_eos=True,
            repetition_penalty=1.3,
        ),
    ],
    ids=["greedy", "seeded-top-p-frequency-penalty", "seeded-top-k-repetition-penalty"],
)
def test_resumed_sequence_continues_exactly(tiny_model_dir: Path, params: SamplingParams) -> None:
    config = EngineConfig(model=str(tiny_model_dir), dtype="float32")
    whole = run_core(LLMEngine(config), EngineCoreRequest("a", PROMPT, params, 0.0))
    assert len(whole) == 24
    for k in (1, 9, 23):
        fresh = LLMEngine(config)  # another replica: no generator, no cache of this request
        resumed = EngineCoreRequest("a", PROMPT, params, 0.0, output_token_ids=whole[:k])
        assert run_core(fresh, resumed) == whole[k:], f"resumed after {k} tokens"


def test_two_replicas_share_evenly_and_affinity_raises_prefix_hits(tiny_model_dir: Path) -> None:
    async def run(
        affinity_blocks: int, workload: list[list[int]], max_tokens: int, concurrency: int
    ) -> AsyncEngine:
        engine = await AsyncEngine.create(
            EngineConfig(model=str(tiny_model_dir), dtype="float32"),
            multiprocess=False,
            replicas=ReplicaConfig(replicas=2, affinity_blocks=affinity_blocks),
        )
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int, prompt: list[int]) -> None:
            async with sem:
                async for out in engine.generate(f"q{i}", prompt, params):
                    assert out.error is None

        await asyncio.gather(*(one(i, p) for i, p in enumerate(workload)))
        await engine.shutdown()
        return engine

    rng = random.Random(0)
    uniform = [[rng.randrange(3, 300) for _ in range(6)] for _ in range(300)]
    engine = asyncio.run(run(0, uniform, 2, 16))
    received = [r._num_received for r in engine.replicas.values()]
    assert sum(received) == 300
    assert all(abs(n - 150) <= 0.2 * 150 for n in received), received

    # 6 long shared prefixes (4 blocks of 16), each asked 16 times with different tails; at most
    # 4 in flight, so the load guard (margin 4) never overrides affinity here
    heads = [[rng.randrange(3, 300) for _ in range(64)] for _ in range(6)]
    shared = [heads[i % 6] + [rng.randrange(3, 300) for _ in range(4)] for i in range(96)]
    rng.shuffle(shared)
    rates = {}
    for blocks in (0, 4):
        engine = asyncio.run(run(blocks, shared, 1, 4))
        stats = engine.stats
        rates[blocks] = stats.prefix_cache_hits / stats.prefix_cache_queries
    assert rates[4] > rates[0], rates
