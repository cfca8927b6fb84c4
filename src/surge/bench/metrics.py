"""Benchmark statistics: percentiles, per-point summaries, goodput, prefix-cache hit rates."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from surge.bench.loadgen import RequestResult

logger = logging.getLogger(__name__)

PERCENTILES = (50, 90, 95, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2e")


@dataclass(frozen=True)
class Slo:
    """A request meets the SLO when its TTFT and its TPOT are both at most these (seconds)."""

    ttft: float = 1.0
    tpot: float = 0.1


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks as numpy's default; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def meets_slo(result: RequestResult, slo: Slo) -> bool:
    """Whether a finished request met both latency targets."""
    return result.ok and result.ttft <= slo.ttft and result.tpot <= slo.tpot


def summarize(results: Sequence[RequestResult], duration: float, slo: Slo) -> dict[str, float]:
    """One point's numbers: throughput, latency percentiles (ms), errors, goodput."""
    ok = [r for r in results if r.ok]
    samples = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.output_tokens > 1],
        "itl": [gap for r in ok for gap in r.itls],
        "e2e": [r.e2e for r in ok],
    }
    duration = max(duration, 1e-9)
    stats: dict[str, float] = {
        "num_requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "duration_s": duration,
        "output_tokens": sum(r.output_tokens for r in ok),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "requests_per_s": len(ok) / duration,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration,
        "goodput_requests_per_s": sum(meets_slo(r, slo) for r in ok) / duration,
        "slo_attainment": sum(meets_slo(r, slo) for r in ok) / len(results) if results else 0.0,
    }
    for name, values in samples.items():
        stats[f"{name}_mean_ms"] = 1000 * sum(values) / len(values) if values else math.nan
        for q in PERCENTILES:
            stats[f"{name}_p{q}_ms"] = 1000 * percentile(values, q)
    return stats


def first_error(results: Sequence[RequestResult]) -> str | None:
    """The first failure's message, to show why a point had errors."""
    return next((r.error for r in results if not r.ok), None)


def client_cache_hit_rate(results: Sequence[RequestResult]) -> float | None:
    """Cached / prompt tokens from the responses themselves (usage details, llama-server timings)."""
    counted = [r for r in results if r.ok and r.cached_tokens is not None and r.prompt_tokens]
    if not counted:
        return None
    return sum(r.cached_tokens or 0 for r in counted) / sum(r.prompt_tokens for r in counted)


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+([-+\w.]+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition, summed over labels, by metric name."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE_RE.match(line)
        if match and not line.startswith("#"):
            try:
                values[match[1]] = values.get(match[1], 0.0) + float(match[3])
            except ValueError:
                continue
    return values


def prefix_cache_counters(samples: dict[str, float]) -> tuple[float, float] | None:
    """(hit tokens, queried tokens) from counters named like vLLM's `*:prefix_cache_hits[_total]`."""
    hits = queries = None
    for name, value in samples.items():
        base = name.split("{", 1)[0].removesuffix("_total")  # surge labels them by model
        if base.endswith("prefix_cache_hits"):
            hits = (hits or 0.0) + value
        elif base.endswith("prefix_cache_queries"):
            queries = (queries or 0.0) + value
    return (hits, queries) if hits is not None and queries is not None else None


def scrape_prefix_cache(base_url: str) -> tuple[float, float] | None:
    """The server's cumulative prefix-cache counters from /metrics, or None if it exposes none."""
    try:
        resp = httpx.get(base_url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    return prefix_cache_counters(parse_prometheus(resp.text))


def hit_rate_between(
    before: tuple[float, float] | None, after: tuple[float, float] | None
) -> float | None:
    """Hit rate over the tokens looked up between two scrapes."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])
