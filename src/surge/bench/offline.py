"""Offline throughput: surge vs HF transformers `generate` (static batches), same weights, same prompts."""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from surge.llm import LLM

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class BenchPoint:
    """One (system, batch size) measurement."""

    system: str
    batch_size: int
    num_requests: int
    output_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / (self.output_tokens / self.batch_size)


def make_prompts(num: int, input_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Seeded random token prompts (ids past the special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(input_len)] for _ in range(num)]


def bench_surge(llm: LLM, prompts: list[list[int]], batch: int, output_len: int) -> BenchPoint:
    """Rounds of `batch` concurrent requests through the engine."""
    from surge import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), batch):
        outs = llm.generate(prompts[i : i + batch], params)
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    return BenchPoint("surge", batch, len(prompts), tokens, time.perf_counter() - start)


def bench_hf(
    model: PreTrainedModel, prompts: list[list[int]], batch: int, output_len: int
) -> BenchPoint:
    """HF `generate`, static batches of equal-length prompts (no padding needed)."""
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i : i + batch])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=0,
        )
        tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return BenchPoint("hf", batch, len(prompts), tokens, time.perf_counter() - start)


def run_offline_bench(args: argparse.Namespace) -> list[BenchPoint]:
    """Measure every batch size for surge and the baseline; print a markdown table."""
    from surge import LLM
    from surge.bench.machine import describe_cpu, machine_info
    from surge.bench.naive_server import load_hf_model
    from surge.cli import engine_config_from_args

    batches = [int(b) for b in args.batch_sizes.split(",")]
    config = engine_config_from_args(args)
    llm = LLM(**{**vars(config), "max_num_seqs": max(max(batches), config.max_num_seqs)})
    runner = llm.engine.core.runner
    vocab = runner.vocab_size
    hf = load_hf_model(llm.engine.files, runner.dtype) if args.baseline == "hf" else None
    points: list[BenchPoint] = []
    warm = make_prompts(2, args.input_len, vocab, seed=99)
    bench_surge(llm, warm, 2, 4)
    if hf is not None:
        with torch.inference_mode():
            bench_hf(hf, warm, 2, 4)
    for batch in batches:
        prompts = make_prompts(
            args.num_requests or max(batch, 16), args.input_len, vocab, seed=batch
        )
        points.append(bench_surge(llm, prompts, batch, args.output_len))
        logger.info("surge batch %d: %.1f tok/s", batch, points[-1].tokens_per_s)
        if hf is not None:
            with torch.inference_mode():
                points.append(bench_hf(hf, prompts, batch, args.output_len))
            logger.info("hf batch %d: %.1f tok/s", batch, points[-1].tokens_per_s)
    machine = machine_info()
    print(f"Machine: {describe_cpu(machine)}\n")
    print(format_table(points, args))
    if args.output:
        rows = [asdict(p) | {"tokens_per_s": p.tokens_per_s} for p in points]
        with open(args.output, "w") as f:
            json.dump({"machine": machine, "points": rows}, f, indent=1)
    return points


def format_table(points: list[BenchPoint], args: argparse.Namespace) -> str:
    """Markdown: one row per batch size, surge beside the baseline."""
    by = {(p.system, p.batch_size): p for p in points}
    lines = [
        f"input {args.input_len} tokens, output {args.output_len} tokens (ignore_eos), greedy",
        "",
        "| batch | requests | surge tok/s | surge ms/step | HF tok/s | HF ms/step | surge / HF |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch in sorted({p.batch_size for p in points}):
        s, h = by.get(("surge", batch)), by.get(("hf", batch))
        hf_cols = (
            f"{h.tokens_per_s:.1f} | {h.ms_per_step:.1f} | {s.tokens_per_s / h.tokens_per_s:.2f}x"
            if h and s
            else "- | - | -"
        )
        lines.append(
            f"| {batch} | {s.num_requests} | {s.tokens_per_s:.1f} | {s.ms_per_step:.1f} | {hf_cols} |"
        )
    return "\n".join(lines)
