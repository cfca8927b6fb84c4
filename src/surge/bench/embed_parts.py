"""The three parts of `surge bench embed`, each on servers it starts and stops itself:
embeddings throughput, cold start of on-demand models, chat beside an embedding ingestion."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx

from surge.bench.baselines import Baseline, ManagedServer
from surge.bench.embed_load import EmbedLoad, embed_closed_loop, measure_direct, post_embeddings
from surge.bench.embed_stats import (
    ingestion_ratio,
    mean_batch_size,
    summarize_cold_starts,
    throughput_ratios,
)
from surge.bench.loadgen import (
    RequestOptions,
    RequestResult,
    make_session,
    run_closed_loop,
    send_chat,
)
from surge.bench.metrics import Slo, first_error, parse_prometheus, summarize
from surge.bench.serve import _free_port
from surge.bench.workloads import Prompt, make_workload
from surge.encoders import pull_default_embedding_model
from surge.models.default_model import pull_default_model

logger = logging.getLogger(__name__)

ADMIN_KEY_ENV = "SURGE_ADMIN_API_KEY"  # read by `surge serve`; keeps the key out of `ps`
Measure = Callable[[str], dict[str, object]]


@dataclass(frozen=True)
class EmbedBenchConfig:
    """Everything one run measures with; frozen, written into the results."""

    parts: tuple[str, ...]
    duration_s: float
    concurrency: tuple[int, ...]
    num_threads: int
    seed: int
    num_texts: int
    chinese_fraction: float
    direct_batch_size: int
    baselines: tuple[str, ...]
    cold_start_repeats: int
    chat_concurrency: int
    chat_max_tokens: int
    ingest_clients: int
    ingest_texts_per_request: int
    chat_model: str
    embedding_model: str
    target: str | None


def surge_baseline(
    extra: list[str], cfg: EmbedBenchConfig, env: dict[str, str] | None = None
) -> Baseline:
    """`surge serve EXTRA` on a free port with the run's thread count."""
    cmd = [sys.executable, "-m", "surge.cli", "serve", *extra, "--host", "127.0.0.1"]
    cmd += ["--port", "{port}", "--threads", str(cfg.num_threads)]
    return Baseline("surge", tuple(cmd), env=env or {}, ready_path="/ready")


def run_on_server(baseline: Baseline, measure: Measure) -> dict[str, object]:
    """Start `baseline`, run `measure(base_url)` once it is ready, stop it; failures recorded."""
    server = ManagedServer(baseline, _free_port())
    entry: dict[str, object] = {
        "command": shlex.join(server.command),
        "loadavg_1m_at_start": os.getloadavg()[0],  # other work on the machine skews every number
    }
    try:
        started = time.perf_counter()
        server.wait_ready()
        entry["startup_s"] = round(time.perf_counter() - started, 1)
        entry |= measure(server.base_url)
        entry["status"] = "ok"
    except (RuntimeError, TimeoutError, httpx.HTTPError, aiohttp.ClientError) as exc:
        logger.error("%s failed: %s\n%s", baseline.name, exc, server.log_tail())
        entry |= {"status": "failed", "reason": str(exc)[:2000]}
    finally:
        server.stop()
    return entry


def scrape_metrics(base_url: str) -> dict[str, float]:
    """The server's /metrics samples (empty if it has none)."""
    try:
        resp = httpx.get(base_url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    return parse_prometheus(resp.text) if resp.status_code == 200 else {}


# ---- part 1: embeddings throughput ----------------------------------------------------------


async def embed_sweep(
    base_url: str, model: str, texts: list[str], cfg: EmbedBenchConfig, name: str
) -> list[dict[str, object]]:
    """A short warm-up, then one closed-loop point per concurrency, with surge's batch size."""
    await embed_closed_loop(base_url, model, texts, max(cfg.concurrency), min(2.0, cfg.duration_s))
    points = []
    for clients in cfg.concurrency:
        before = await asyncio.to_thread(scrape_metrics, base_url)
        load = await embed_closed_loop(base_url, model, texts, clients, cfg.duration_s)
        after = await asyncio.to_thread(scrape_metrics, base_url)
        point = load.summary() | {"mean_batch_size": mean_batch_size(before, after)}
        logger.info(
            "%s c=%d: %.1f sentences/s, p50 %s ms, mean batch %s, %d errors",
            name,
            clients,
            point["sentences_per_s"],
            _round(point["latency_p50_ms"]),
            _round(point["mean_batch_size"]),
            point["errors"],
        )
        points.append(point)
    return points


def _round(value: object) -> object:
    return round(value, 1) if isinstance(value, float) else value


def run_throughput(cfg: EmbedBenchConfig, texts: list[str]) -> dict[str, object]:
    """Part 1: surge (or --target), the naive server and in-process sentence-transformers."""
    model_dir = pull_default_embedding_model()
    out: dict[str, object] = {}

    def sweep(name: str, model: str) -> Measure:
        return lambda url: {"points": asyncio.run(embed_sweep(url, model, texts, cfg, name))}

    if cfg.target:
        out["surge"] = {"url": cfg.target, "status": "ok"} | sweep("target", cfg.embedding_model)(
            cfg.target
        )
    else:
        # the worker gets the baselines' threads here (alone on the machine; beside chat it
        # runs on one thread, niced)
        extra = ["--model", f"{cfg.embedding_model}={model_dir}"]
        surge = surge_baseline([*extra, "--encoder-threads", str(cfg.num_threads)], cfg)
        out["surge"] = run_on_server(surge, sweep("surge", cfg.embedding_model))
    if "naive" in cfg.baselines:
        cmd = [sys.executable, "-m", "surge.bench.naive_embed_server", str(model_dir)]
        cmd += ["--port", "{port}", "--threads", str(cfg.num_threads)]
        naive = Baseline("naive", tuple(cmd))
        out["naive"] = run_on_server(naive, sweep("naive", model_dir.name))
    if "direct" in cfg.baselines:
        direct = measure_direct(
            model_dir, texts, cfg.direct_batch_size, cfg.duration_s, cfg.num_threads
        )
        logger.info("direct: %.1f sentences/s", direct["sentences_per_s"])
        out["direct"] = direct
    out["ratios"] = throughput_ratios(out)
    return out


# ---- part 2: cold start -----------------------------------------------------------------------


async def _first_output(
    session: aiohttp.ClientSession, base_url: str, model: str, kind: str, text: str
) -> float:
    """Seconds to the first streamed token (chat) or to the whole response (embedding)."""
    if kind == "chat":
        opts = RequestOptions(base_url, model, include_usage=False)
        result = await send_chat(session, opts, Prompt((("user", "Say hello."),), 4))
        if not result.ok:
            raise RuntimeError(f"chat request to {model} failed: {result.error}")
        return result.ttft
    sent = time.perf_counter()
    error = await post_embeddings(session, base_url, model, [text])
    if error is not None:
        raise RuntimeError(f"embedding request to {model} failed: {error}")
    return time.perf_counter() - sent


async def _unload(session: aiohttp.ClientSession, base_url: str, model: str, key: str) -> None:
    url = f"{base_url}/v1/models/{model}/unload"
    async with session.post(url, headers={"Authorization": f"Bearer {key}"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"unload {model}: HTTP {resp.status} {await resp.text()}")


async def cold_starts(
    base_url: str, admin_key: str, cfg: EmbedBenchConfig, text: str
) -> dict[str, object]:
    """Each model cold (unloaded), then warm, then unloaded again; `cold_start_repeats` times."""
    runs: list[dict[str, object]] = []
    models = ((cfg.chat_model, "chat"), (cfg.embedding_model, "embedding"))
    async with make_session(4) as session:
        for repeat in range(cfg.cold_start_repeats):
            for model, kind in models:
                cold = await _first_output(session, base_url, model, kind, text)
                warm = await _first_output(session, base_url, model, kind, text)
                await _unload(session, base_url, model, admin_key)
                logger.info("cold start %s: %.2f s (warm %.3f s)", model, cold, warm)
                run = {"repeat": repeat, "model": model, "kind": kind}
                runs.append(run | {"cold_s": cold, "warm_s": warm})
    return {"runs": runs, "summary": summarize_cold_starts(runs)}


def run_cold_start(cfg: EmbedBenchConfig, texts: list[str]) -> dict[str, object]:
    """Part 2: `surge serve --models-dir D` over links to the bundled models, none loaded."""
    if cfg.target:
        return {"status": "skipped", "reason": "needs a server this run starts (--target given)"}
    key = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="surge-bench-models-") as models_dir:
        root = Path(models_dir)
        (root / f"{cfg.chat_model}.gguf").symlink_to(pull_default_model())
        (root / cfg.embedding_model).symlink_to(pull_default_embedding_model())
        baseline = surge_baseline(["--models-dir", models_dir], cfg, env={ADMIN_KEY_ENV: key})
        return run_on_server(
            baseline, lambda url: asyncio.run(cold_starts(url, key, cfg, texts[0]))
        )


# ---- part 3: chat beside an embedding ingestion -----------------------------------------------


def _chat_summary(results: list[RequestResult], seconds: float) -> dict[str, object]:
    stats = summarize(results, seconds, Slo())
    keys = ("completed", "errors", "duration_s", "output_tokens_per_s", "requests_per_s")
    keys += ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
    return {k: stats[k] for k in keys} | {"first_error": first_error(results)}


async def _chat_point(
    opts: RequestOptions, prompts: list[Prompt], cfg: EmbedBenchConfig, desc: str
) -> dict[str, object]:
    results, seconds = await run_closed_loop(
        opts, prompts, cfg.chat_concurrency, cfg.duration_s, desc
    )
    point = _chat_summary(results, seconds)
    logger.info("%s: %.1f tok/s", desc, point["output_tokens_per_s"])
    return point


async def chat_with_ingestion(
    base_url: str, cfg: EmbedBenchConfig, texts: list[str]
) -> dict[str, object]:
    """Chat at `chat_concurrency` alone, with `ingest_clients` embedding beside it, alone again."""
    opts = RequestOptions(base_url, cfg.chat_model, extra_body={"ignore_eos": True})
    num_prompts = int(cfg.duration_s * 100) + 4 * cfg.chat_concurrency
    prompts = make_workload("short", num_prompts, cfg.chat_max_tokens, cfg.seed)
    # One short wave at full concurrency, and some embeddings: the batch shapes the points use.
    wave = [Prompt(p.messages, 8) for p in prompts[: cfg.chat_concurrency]]
    await run_closed_loop(opts, wave, cfg.chat_concurrency, desc="warm-up")
    await embed_closed_loop(base_url, cfg.embedding_model, texts, cfg.ingest_clients, 1.0)
    alone = await _chat_point(opts, prompts, cfg, "chat alone")
    stop = asyncio.Event()
    ingestion: asyncio.Task[EmbedLoad] = asyncio.create_task(
        embed_closed_loop(
            base_url,
            cfg.embedding_model,
            texts,
            cfg.ingest_clients,
            math.inf,
            cfg.ingest_texts_per_request,
            stop,
        )
    )
    try:
        mixed = await _chat_point(opts, prompts, cfg, "chat + ingestion")
    finally:
        stop.set()
    ingest = (await ingestion).summary()
    after = await _chat_point(opts, prompts, cfg, "chat alone again")
    tok_s = [p["output_tokens_per_s"] for p in (alone, mixed, after)]
    return {
        "alone": alone,
        "with_ingestion": mixed,
        "alone_after": after,
        "ingestion": ingest,
        "ratio": ingestion_ratio(tok_s[0], tok_s[1], tok_s[2]),
    }


def run_mixed(cfg: EmbedBenchConfig, texts: list[str]) -> dict[str, object]:
    """Part 3: one `surge serve` with no model arguments (bundled chat + embedding models)."""

    def measure(url: str) -> dict[str, object]:
        return asyncio.run(chat_with_ingestion(url, cfg, texts))

    if cfg.target:
        return {"url": cfg.target, "status": "ok"} | measure(cfg.target)
    baseline = surge_baseline(["--max-num-seqs", str(cfg.chat_concurrency)], cfg)
    return run_on_server(baseline, measure)
