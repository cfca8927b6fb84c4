"""The arithmetic of `surge bench embed`'s results: ratios, batch sizes, cold-start summaries.

Pure functions over plain numbers and the result dicts (as written to JSON): no I/O, tested."""

from __future__ import annotations

from collections.abc import Sequence

ROWS_METRIC = "surge:encoder_rows_total"
BATCHES_METRIC = "surge:encoder_batches_total"
# The goals of part 1, judged at the highest concurrency measured.
TARGET_VS_DIRECT = 0.60
TARGET_VS_NAIVE = 5.0


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not > 0."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def mean_batch_size(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Rows per encoder batch between two /metrics scrapes (None if no batch ran meanwhile)."""
    rows = after.get(ROWS_METRIC, 0.0) - before.get(ROWS_METRIC, 0.0)
    return ratio(rows, after.get(BATCHES_METRIC, 0.0) - before.get(BATCHES_METRIC, 0.0))


def _rate_by_clients(system: dict | None) -> dict[int, float]:
    points = (system or {}).get("points") or []
    return {int(p["clients"]): float(p["sentences_per_s"]) for p in points}


def throughput_ratios(throughput: dict) -> dict[str, object]:
    """surge / direct and surge / naive at each concurrency of part 1's result, and whether the
    targets are met at the highest concurrency (None where a side was not measured)."""
    surge = _rate_by_clients(throughput.get("surge"))
    naive = _rate_by_clients(throughput.get("naive"))
    direct = (throughput.get("direct") or {}).get("sentences_per_s")
    rows = {
        clients: {"vs_direct": ratio(rate, direct), "vs_naive": ratio(rate, naive.get(clients))}
        for clients, rate in sorted(surge.items())
    }
    top = max(rows, default=None)
    at_top = rows[top] if top is not None else {}
    vs_direct, vs_naive = at_top.get("vs_direct"), at_top.get("vs_naive")
    return {
        "by_clients": {str(c): r for c, r in rows.items()},
        "clients": top,
        "vs_direct": vs_direct,
        "vs_naive": vs_naive,
        "target_vs_direct": TARGET_VS_DIRECT,
        "target_vs_naive": TARGET_VS_NAIVE,
        "meets_vs_direct": None if vs_direct is None else vs_direct >= TARGET_VS_DIRECT,
        "meets_vs_naive": None if vs_naive is None else vs_naive >= TARGET_VS_NAIVE,
    }


def summarize_cold_starts(runs: Sequence[dict]) -> list[dict[str, object]]:
    """Per model, in first-seen order: mean, min and max cold seconds, and the mean warm ones."""
    out: list[dict[str, object]] = []
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        cold = [float(r["cold_s"]) for r in mine]
        warm = [float(r["warm_s"]) for r in mine]
        out.append(
            {
                "model": model,
                "kind": mine[0]["kind"],
                "repeats": len(mine),
                "cold_mean_s": sum(cold) / len(cold),
                "cold_min_s": min(cold),
                "cold_max_s": max(cold),
                "warm_mean_s": sum(warm) / len(warm),
            }
        )
    return out


def ingestion_ratio(
    alone_before: float | None, with_ingestion: float | None, alone_after: float | None = None
) -> float | None:
    """Chat throughput with an ingestion beside it over chat alone; `alone` is the mean of the
    runs before and after when both exist, so a drift of the machine between them cancels."""
    alones = [a for a in (alone_before, alone_after) if a is not None]
    return ratio(with_ingestion, sum(alones) / len(alones) if alones else None)
