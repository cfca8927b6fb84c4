"""Perplexity of a model on a fixed text, through surge's own model step (any weight format).

The accuracy gate for quantized weights: the same text, the same windows, each format against
bf16 of the same model (`surge bench perplexity`). The text (English and Chinese, ~4 KB) ships
in surge/bench/data; it is cut into windows of `window` tokens, each scored from an empty cache,
every token but a window's first predicted from the ones before it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_PATH = Path(__file__).with_name("data") / "perplexity.txt"
_LOGIT_ROWS = 256  # logits computed this many positions at a time ([rows, vocab] float32)


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    """exp(mean negative log-likelihood) over `tokens` scored tokens."""

    perplexity: float
    tokens: int
    weights: str  # the runner's weights summary (e.g. "Q4_1 x 120, Q8_0 x 1 (92 MiB)")


def default_text() -> str:
    """The shipped English + Chinese text."""
    return TEXT_PATH.read_text(encoding="utf-8")


@torch.inference_mode()
def score_tokens(runner, token_ids: list[int], window: int) -> tuple[float, int]:
    """Sum of -log p(token | previous in its window) and the count, on a ModelRunner's model.

    Uses the runner's KV cache from block 0: run it on an engine with no requests in flight.
    """
    from surge.models.attention import build_attention_metadata

    model, block_size = runner.model, runner.config.block_size
    nll, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        ids = token_ids[start : start + window]
        if len(ids) < 2:
            break
        blocks = list(range(-(-len(ids) // block_size)))
        meta = build_attention_metadata([len(ids)], [len(ids)], [blocks], block_size)
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), runner.kv_caches, meta)
        targets = torch.tensor(ids[1:])
        for i in range(0, len(ids) - 1, _LOGIT_ROWS):
            logits = model.compute_logits(hidden[i : min(i + _LOGIT_ROWS, len(ids) - 1)])
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp.gather(1, targets[i : i + logits.shape[0], None])
            nll -= float(picked.sum())
            count += logits.shape[0]
    return nll, count


def perplexity(llm, text: str | None = None, window: int = 512) -> PerplexityResult:
    """Perplexity of an in-process `surge.LLM` on `text` (default: the shipped text)."""
    from surge.models.quant import weights_summary

    runner = llm.engine.core.runner
    if runner.kv_caches[0][0].shape[0] < window:
        raise ValueError(f"the KV cache holds fewer than window={window} tokens")
    token_ids = llm.engine.tokenizer.encode(text if text is not None else default_text())
    nll, count = score_tokens(runner, token_ids, window)
    return PerplexityResult(math.exp(nll / count), count, weights_summary(runner.model))


def run_perplexity_bench(args: argparse.Namespace) -> list[tuple[str, PerplexityResult]]:
    """Perplexity of the model under each --quantization in args.formats; prints a table."""
    from surge import LLM
    from surge.bench.machine import describe_cpu, machine_info
    from surge.cli import engine_config_from_args

    results = []
    for method in args.formats.split(","):
        args.quantization = method
        config = engine_config_from_args(args)
        blocks = -(-args.window // config.block_size)
        llm = LLM(**{**vars(config), "num_kv_blocks": blocks})
        results.append((method, perplexity(llm, window=args.window)))
        del llm  # one model in memory at a time
    base = results[0][1].perplexity
    print(f"Machine: {describe_cpu(machine_info())}\n")
    print(f"{results[0][1].tokens} tokens of {TEXT_PATH.name}, windows of {args.window}\n")
    print("| --quantization | weights | perplexity | vs first |")
    print("|---|---|---|---|")
    for method, r in results:
        print(f"| {method} | {r.weights} | {r.perplexity:.4f} | {r.perplexity / base - 1:+.2%} |")
    return results
