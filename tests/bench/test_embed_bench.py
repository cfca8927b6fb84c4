"""`surge bench embed`'s pure parts: seeded chunks, ratios, batch sizes, the tables; no server."""

from __future__ import annotations

import re

import pytest

from surge.bench.embed import config_from_args, default_output
from surge.bench.embed_load import make_chunks
from surge.bench.embed_report import format_tables
from surge.bench.embed_stats import (
    ingestion_ratio,
    mean_batch_size,
    ratio,
    summarize_cold_starts,
    throughput_ratios,
)
from surge.bench.metrics import parse_prometheus
from surge.cli import build_parser

_CJK = re.compile(r"[\u4e00-\u9fff]")


def test_chunks_are_seeded_and_mixed() -> None:
    texts = make_chunks(200, seed=3)
    assert texts == make_chunks(200, seed=3)
    assert texts != make_chunks(200, seed=4)
    chinese = [t for t in texts if _CJK.search(t)]
    english = [t for t in texts if not _CJK.search(t)]
    assert 60 < len(chinese) < 140 and len(chinese) + len(english) == 200
    assert all(20 <= len(t.split()) <= 200 for t in english)
    assert all(30 <= len(t) <= 300 for t in chinese)  # 1.5 characters a word
    assert len({len(t) for t in texts}) > 50  # lengths vary, as chunks of a real corpus do


def test_chunk_language_mix_follows_the_fraction() -> None:
    assert not any(_CJK.search(t) for t in make_chunks(50, chinese_fraction=0.0))
    assert all(_CJK.search(t) for t in make_chunks(50, chinese_fraction=1.0))
    with pytest.raises(ValueError):
        make_chunks(5, min_words=0)


def test_ratio_and_ingestion_ratio() -> None:
    assert ratio(3.0, 4.0) == 0.75
    assert ratio(None, 4.0) is None and ratio(3.0, None) is None and ratio(3.0, 0.0) is None
    assert ingestion_ratio(100.0, 80.0, 60.0) == pytest.approx(1.0)  # vs the mean of both
    assert ingestion_ratio(100.0, 80.0) == pytest.approx(0.8)
    assert ingestion_ratio(None, 80.0, None) is None


def test_mean_batch_size_from_metrics_scrapes() -> None:
    def scrape(rows: int, batches: int) -> dict[str, float]:
        text = (
            "# TYPE surge:encoder_rows counter\n"
            f'surge:encoder_rows_total{{model="all-MiniLM-L6-v2"}} {rows}.0\n'
            f'surge:encoder_batches_total{{model="all-MiniLM-L6-v2"}} {batches}.0\n'
        )
        return parse_prometheus(text)

    assert mean_batch_size(scrape(10, 10), scrape(330, 20)) == pytest.approx(32.0)
    assert mean_batch_size(scrape(10, 10), scrape(10, 10)) is None  # no batch ran
    assert mean_batch_size({}, {}) is None  # a server without the counters


def _point(clients: int, rate: float) -> dict[str, object]:
    return {"clients": clients, "sentences_per_s": rate, "latency_p50_ms": 10.0}


def test_throughput_ratios_at_the_top_concurrency() -> None:
    part = {
        "surge": {"points": [_point(1, 50.0), _point(32, 300.0)]},
        "naive": {"points": [_point(1, 50.0), _point(32, 50.0)]},
        "direct": {"sentences_per_s": 400.0},
    }
    r = throughput_ratios(part)
    assert r["clients"] == 32
    assert r["vs_direct"] == pytest.approx(0.75) and r["meets_vs_direct"] is True
    assert r["vs_naive"] == pytest.approx(6.0) and r["meets_vs_naive"] is True
    assert r["by_clients"]["1"] == {"vs_direct": 0.125, "vs_naive": 1.0}
    del part["naive"]
    part["direct"] = {"sentences_per_s": 1000.0}
    r = throughput_ratios(part)
    assert r["vs_naive"] is None and r["meets_vs_naive"] is None
    assert r["meets_vs_direct"] is False


def test_cold_start_summary() -> None:
    runs = [
        {"model": "chat", "kind": "chat", "cold_s": 2.0, "warm_s": 0.1},
        {"model": "emb", "kind": "embedding", "cold_s": 1.0, "warm_s": 0.02},
        {"model": "chat", "kind": "chat", "cold_s": 4.0, "warm_s": 0.3},
    ]
    chat, emb = summarize_cold_starts(runs)
    assert (chat["model"], chat["repeats"], chat["cold_mean_s"]) == ("chat", 2, 3.0)
    assert (chat["cold_min_s"], chat["cold_max_s"]) == (2.0, 4.0)
    assert chat["warm_mean_s"] == pytest.approx(0.2)
    assert (emb["kind"], emb["repeats"]) == ("embedding", 1)


def test_cli_flags_and_default_output() -> None:
    args = build_parser().parse_args(
        ["bench", "embed", "--parts", "throughput", "--concurrency", "1,4", "--threads", "3"]
    )
    cfg = config_from_args(args)
    assert cfg.parts == ("throughput",) and cfg.concurrency == (1, 4) and cfg.num_threads == 3
    assert cfg.baselines == ("direct", "naive") and cfg.target is None
    bad = build_parser().parse_args(["bench", "embed", "--parts", "throughput,speed"])
    with pytest.raises(SystemExit):
        config_from_args(bad)
    path = default_output("Intel(R) Xeon(R) Platinum 8480+", "2026-11-30")
    assert str(path) == "benchmarks/results/embed-intel-r-xeon-r-platinum-8480-2026-11-30.json"


def test_tables_render_every_part() -> None:
    chat = {
        "output_tokens_per_s": 500.0,
        "requests_per_s": 7.8,
        "ttft_p50_ms": 120.0,
        "itl_p50_ms": 30.0,
        "errors": 0,
    }
    result = {
        "started": "2026-11-30T12:00:00+0000",
        "command": "surge bench embed --duration 3",
        "machine": {
            "cpu": "Test CPU",
            "num_cpus": 2,
            "memory_gib": 24.0,
            "cpu_flags": ["avx512_bf16"],
            "python": "3.11.7",
            "torch": "2.13.0",
            "sentence_transformers": "6.2.0",
        },
        "config": {
            "num_threads": 2,
            "duration_s": 3.0,
            "seed": 0,
            "chinese_fraction": 0.5,
            "chat_concurrency": 32,
            "chat_max_tokens": 64,
            "ingest_clients": 8,
            "ingest_texts_per_request": 1,
        },
        "throughput": {
            "surge": {"points": [_point(32, 300.0) | {"mean_batch_size": 24.0}]},
            "naive": {"points": [_point(32, 50.0)]},
            "direct": {"sentences_per_s": 400.0, "batch_size": 32, "texts_per_call": 128},
        },
        "cold_start": {
            "status": "ok",
            "summary": summarize_cold_starts(
                [{"model": "SmolLM2", "kind": "chat", "cold_s": 2.5, "warm_s": 0.05}]
            ),
        },
        "mixed": {
            "status": "ok",
            "alone": chat,
            "with_ingestion": chat | {"output_tokens_per_s": 400.0},
            "alone_after": chat,
            "ingestion": {"sentences_per_s": 120.0},
            "ratio": 0.8,
        },
    }
    result["throughput"]["ratios"] = throughput_ratios(result["throughput"])
    text = format_tables(result)
    assert "2 CPUs, Test CPU (avx512_bf16)" in text
    assert "| 32 | 300.0 | 24.0 | 10 | - | 50.0 | 10 | 6.00x | 0.75 |" in text
    assert "target >= 0.6: met" in text and "target >= 5.0x: met" in text
    assert "| SmolLM2 | first streamed token | 2.50 |" in text
    assert "| with ingestion | 400.0 | 7.80 | 120 | 30.0 | 0 | 120.0 |" in text
    assert "alone (the mean of the runs before and after): 0.80." in text
