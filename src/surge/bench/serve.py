"""`surge bench serve`: one workload, several systems, a sweep of loads; JSON + PNG + a table."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shlex
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from surge.bench.baselines import LaunchSettings, ManagedServer, get_baseline
from surge.bench.loadgen import RequestOptions, run_closed_loop, run_open_loop, warm_up
from surge.bench.machine import machine_info
from surge.bench.metrics import (
    Slo,
    client_cache_hit_rate,
    first_error,
    hit_rate_between,
    scrape_prefix_cache,
    summarize,
)
from surge.bench.workloads import Prompt, make_workload

logger = logging.getLogger(__name__)

RESULT_VERSION = 1


@dataclass(frozen=True)
class SweepConfig:
    """The load every system gets in one run."""

    workload: str
    num_prompts: int
    max_tokens: int
    seed: int
    ignore_eos: bool
    concurrency: tuple[int, ...]
    request_rates: tuple[float, ...]
    slo: Slo
    num_warmup: int
    max_duration: float | None
    prefix_caching: bool


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def sweep_config_from_args(args: argparse.Namespace) -> SweepConfig:
    """Normalize the CLI flags (comma lists -> tuples)."""
    rates = tuple(float(x) for x in (args.request_rate or "").split(",") if x.strip())
    concurrency = _ints(args.concurrency) if args.concurrency else ()
    if not concurrency and not rates:
        raise SystemExit("give --concurrency and/or --request-rate")
    return SweepConfig(
        workload=args.workload,
        num_prompts=args.num_prompts,
        max_tokens=args.max_tokens,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        concurrency=concurrency,
        request_rates=rates,
        slo=Slo(args.slo_ttft, args.slo_tpot),
        num_warmup=args.num_warmup,
        max_duration=args.max_duration,
        prefix_caching=not args.no_prefix_caching,
    )


def served_model(base_url: str) -> str:
    """The first model id the server lists (what requests must name)."""
    resp = httpx.get(base_url + "/v1/models", timeout=30)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def _measure_point(
    opts: RequestOptions, prompts: list[Prompt], cfg: SweepConfig, mode: str, load: float, desc: str
) -> dict[str, object]:
    before = await asyncio.to_thread(scrape_prefix_cache, opts.base_url)
    if mode == "concurrency":
        results, seconds = await run_closed_loop(opts, prompts, int(load), cfg.max_duration, desc)
    else:
        results, seconds = await run_open_loop(
            opts, prompts, load, cfg.seed, cfg.max_duration, desc
        )
    after = await asyncio.to_thread(scrape_prefix_cache, opts.base_url)
    rate, source = hit_rate_between(before, after), "metrics"
    if rate is None:
        rate, source = client_cache_hit_rate(results), "responses"
    point: dict[str, object] = {"mode": mode, "load": load, **summarize(results, seconds, cfg.slo)}
    point |= {
        "prefix_cache_hit_rate": rate,
        "prefix_cache_source": source if rate is not None else None,
    }
    point["first_error"] = first_error(results)
    return point


async def sweep(
    opts: RequestOptions, prompts: list[Prompt], cfg: SweepConfig, name: str
) -> list[dict[str, object]]:
    """Warm up, then every concurrency and rate point, in order, on one running target."""
    await warm_up(opts, prompts, cfg.num_warmup)
    loads = [("concurrency", float(c)) for c in cfg.concurrency]
    loads += [("rate", r) for r in cfg.request_rates]
    points = []
    for mode, load in loads:
        desc = f"{name} {'c' if mode == 'concurrency' else 'rate'}={load:g}"
        point = await _measure_point(opts, prompts, cfg, mode, load, desc)
        points.append({"system": name, **point})
        logger.info(
            "%s: %.1f tok/s, %.2f req/s, TTFT p50 %.0f ms, ITL p50 %.1f ms, %d errors",
            desc,
            point["output_tokens_per_s"],
            point["requests_per_s"],
            point["ttft_p50_ms"],
            point["itl_p50_ms"],
            point["errors"],
        )
    return points


def _options(
    base_url: str, model: str, extra: dict[str, object], cfg: SweepConfig
) -> RequestOptions:
    if not cfg.ignore_eos:
        extra = {k: v for k, v in extra.items() if k != "ignore_eos"}
    return RequestOptions(base_url=base_url.rstrip("/"), model=model, extra_body=extra)


def run_target(
    url: str, model: str | None, prompts: list[Prompt], cfg: SweepConfig
) -> dict[str, object]:
    """Measure an endpoint that is already running."""
    url = url.rstrip("/").removesuffix("/v1")
    opts = _options(url, model or served_model(url), {"ignore_eos": True}, cfg)
    points = asyncio.run(sweep(opts, prompts, cfg, "target"))
    return {"name": "target", "status": "ok", "url": url, "model": opts.model, "points": points}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_system(
    name: str, settings: LaunchSettings, prompts: list[Prompt], cfg: SweepConfig
) -> dict[str, object]:
    """Start system `name`, sweep it, stop it; skipped (with the reason) if not installed here."""
    baseline = get_baseline(name, settings)
    # Other work on the machine skews every number: keep the load it had when this system began.
    entry: dict[str, object] = {
        "name": name,
        "version": baseline.version,
        "loadavg_1m_at_start": os.getloadavg()[0],
    }
    if baseline.missing:
        logger.warning("skipping %s: %s", name, baseline.missing)
        return entry | {"status": "skipped", "reason": baseline.missing, "points": []}
    server = ManagedServer(baseline, _free_port())
    entry["command"] = shlex.join(server.command)
    entry["env"] = baseline.env
    try:
        started = time.perf_counter()
        server.wait_ready()
        entry["startup_s"] = round(time.perf_counter() - started, 1)
        opts = _options(server.base_url, served_model(server.base_url), baseline.extra_body, cfg)
        entry["points"] = asyncio.run(sweep(opts, prompts, cfg, name))
        entry["status"] = "ok"
    except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
        logger.error("%s failed: %s\n%s", name, exc, server.log_tail())
        entry |= {"status": "failed", "reason": str(exc)[:2000], "points": []}
    finally:
        server.stop()
    return entry


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _finite(value: object) -> object:
    """NaN (a percentile of no samples) -> None, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def default_output(workload: str) -> Path:
    """benchmarks/results/serve_<workload>.json (the file `surge bench report` reads)."""
    return Path("benchmarks") / "results" / f"serve_{workload.replace('-', '_')}.json"


def run_serve_bench(args: argparse.Namespace, argv: list[str]) -> dict[str, object]:
    """The whole run: every system in turn, then one JSON file, plots and a printed table."""
    from surge.bench.report import format_run_tables, write_plots

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    try:  # fail now, not after minutes of measuring
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            "surge bench serve plots with matplotlib: pip install 'surge[bench]'"
        ) from exc
    cfg = sweep_config_from_args(args)
    prompts = make_workload(cfg.workload, cfg.num_prompts, cfg.max_tokens, cfg.seed)
    max_seqs = max((*cfg.concurrency, 64 if cfg.request_rates else 1))
    settings = LaunchSettings(
        model=args.model,
        max_num_seqs=max_seqs,
        dtype=args.dtype,
        prefix_caching=cfg.prefix_caching,
        threads=args.threads,
    )
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.target:
        systems = [run_target(args.target, args.served_model_name, prompts, cfg)]
    else:
        names = [s.strip() for s in args.systems.split(",") if s.strip()]
        systems = [run_system(name, settings, prompts, cfg) for name in names]
    result = {
        "version": RESULT_VERSION,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(["surge", *argv]),
        "machine": machine_info(),
        "config": asdict(cfg) | {"model": args.model or "SmolLM2-135M-Instruct (bundled GGUF)"},
        "launch": asdict(settings),
        "systems": systems,
    }
    output = Path(args.output) if args.output else default_output(cfg.workload)
    output.parent.mkdir(parents=True, exist_ok=True)
    result["plots"] = [p.name for p in write_plots(result, output.with_suffix(""))]
    output.write_text(json.dumps(_finite(result), indent=1, default=str) + "\n")
    logger.info("results: %s (+ %s)", output, ", ".join(result["plots"]))
    print(format_run_tables(result))
    return result


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `surge bench serve`."""
    from surge.bench.workloads import WORKLOADS

    parser.add_argument(
        "--systems",
        default="surge",
        help="comma list of surge (bf16), surge-quant (a GGUF kept quantized), naive, vllm, llamacpp",
    )
    parser.add_argument("--target", default=None, help="URL of a running OpenAI-compatible server")
    parser.add_argument("--served-model-name", default=None, help="model to request (--target)")
    parser.add_argument("--model", default=None, help="surge's model (default: the bundled one)")
    parser.add_argument("--dtype", default="auto", help="dtype for surge and naive")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workload", default="short", choices=WORKLOADS)
    parser.add_argument(
        "--concurrency", default="1,4,16,32,64", help="closed-loop users, comma list"
    )
    parser.add_argument("--request-rate", default="", help="open-loop Poisson req/s, comma list")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per point")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate max_tokens every time (where the target accepts it)",
    )
    parser.add_argument("--num-warmup", type=int, default=2)
    parser.add_argument(
        "--max-duration",
        type=float,
        default=None,
        help="seconds per point after which no new request starts",
    )
    parser.add_argument("--slo-ttft", type=float, default=1.0, help="seconds")
    parser.add_argument("--slo-tpot", type=float, default=0.1, help="seconds")
    parser.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="turn prefix/prompt caching off in every system",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="JSON path (default benchmarks/results/serve_<workload>.json)",
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main_serve(args: argparse.Namespace) -> int:
    """CLI entry: the command line as typed goes into the results."""
    # SIGTERM, and SIGINT (ignored in background jobs), unwind like Ctrl-C: the `finally` of
    # run_system then stops the server this run started, children included.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    run_serve_bench(args, sys.argv[1:])
    return 0
