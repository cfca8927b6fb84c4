"""`surge bench serve` end to end on a tiny model, and the naive baseline server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from surge.bench.baselines import LaunchSettings, ManagedServer, naive_baseline
from surge.bench.report import regenerate
from surge.bench.serve import run_serve_bench
from surge.cli import build_parser
from tests.server.utils import free_port


def test_bench_serve_surge_writes_json_and_plots(bench_tiny_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "results" / "serve_short.json"
    argv = [
        "bench",
        "serve",
        "--systems",
        "surge",
        "--model",
        str(bench_tiny_model),
        "--concurrency",
        "1,4",
        "--num-prompts",
        "6",
        "--max-tokens",
        "8",
        "--num-warmup",
        "1",
        "--threads",
        "1",
        "--dtype",
        "float32",
        "--output",
        str(output),
    ]
    result = run_serve_bench(build_parser().parse_args(argv), argv)
    saved = json.loads(output.read_text())
    assert saved["command"].startswith("surge bench serve")
    assert {"cpu", "num_cpus", "torch", "python"} <= saved["machine"].keys()
    (system,) = saved["systems"]
    assert system["name"] == "surge" and system["status"] == "ok", system
    assert "surge" in system["version"] and "--max-num-seqs 4" in system["command"]
    points = system["points"]
    assert [(p["mode"], p["load"]) for p in points] == [("concurrency", 1.0), ("concurrency", 4.0)]
    for p in points:
        assert p["errors"] == 0 and p["completed"] == 6, p["first_error"]
        assert p["output_tokens"] == 6 * 8  # ignore_eos: every request runs to max_tokens
        assert p["output_tokens_per_s"] > 0 and p["goodput_requests_per_s"] >= 0
        for key in ("ttft", "tpot", "itl", "e2e"):
            assert p[f"{key}_p50_ms"] <= p[f"{key}_p90_ms"] <= p[f"{key}_p99_ms"]
    assert result["plots"] == ["serve_short_throughput.png", "serve_short_latency.png"]
    for name in result["plots"]:
        assert (output.parent / name).read_bytes()[:4] == b"\x89PNG"
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Offline\nkept\n")
    text = regenerate(output.parent, md).read_text()
    assert "## Offline\nkept" in text and "### Workload `short`" in text
    assert "](results/serve_short_throughput.png)" in text and "| surge | 4 | 6/6 |" in text


def test_naive_server_streams_one_chat(bench_tiny_model: Path) -> None:
    settings = LaunchSettings(model=str(bench_tiny_model), dtype="float32", threads=1)
    server = ManagedServer(naive_baseline(settings), free_port())
    try:
        server.wait_ready()
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        with httpx.stream(
            "POST", server.base_url + "/v1/chat/completions", json=body, timeout=60
        ) as r:
            assert r.status_code == 200
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        server.stop()
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks)
