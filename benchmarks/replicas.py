#!/usr/bin/env python
"""Replicas benchmark: several engine cores per chat model inside one `surge serve`.

    python benchmarks/replicas.py                  # defaults: about 10 minutes on 2 CPU cores
    python benchmarks/replicas.py --quick          # smoke test: a few requests, a handful of tokens
    python benchmarks/replicas.py --parts 3 --failover-streams 32 -- --max-num-seqs 64

Three measurements, each on servers this script starts on 127.0.0.1 (free ports) and stops by
PID, children included, at the end, even on error:
1. prefix affinity on vs off (`--affinity-blocks 0`), 2 replicas, a shared-prefix workload (a few
   long system prompts shared by many requests): TTFT, the prefix-cache hit rate from the
   engines' own counters (summed over replicas) and each replica's share of the requests;
2. throughput, 1 vs 2 replicas (and 2 with affinity off): output tokens/s, and the API process's
   CPU per streamed token and its utilisation of one core (is the one event loop the limit?);
3. failover: greedy streams in flight on 2 replicas, one replica's core killed with SIGKILL; for
   each stream that was on it, the gap between its last token before the kill and its next one
   after; every stream must still end with [DONE], no error, and all its tokens.
Arguments after `--` go to every `surge serve`. Writes benchmarks/results/replicas_<date>.json
(--output to change) and prints a table naming the CPU. Exit status 1 if a part failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
from prometheus_client.parser import text_string_to_metric_families

from surge.bench.baselines import Baseline, ManagedServer
from surge.bench.loadgen import (
    RequestOptions,
    RequestResult,
    StreamAccumulator,
    make_session,
    read_events,
    run_closed_loop,
    warm_up,
)
from surge.bench.machine import describe_cpu, machine_info
from surge.bench.metrics import Slo, first_error, percentile, summarize
from surge.bench.serve import served_model
from surge.bench.workloads import Prompt, english_text, make_workload

logger = logging.getLogger("replicas")

RESULT_VERSION = 1
QUICK = {  # --quick: every part end to end, at the smallest scale
    "prefix_requests": 8,
    "prefix_concurrency": 4,
    "num_prefixes": 2,
    "prefix_max_tokens": 4,
    "tput_requests": 8,
    "tput_concurrency": 4,
    "tput_max_tokens": 8,
    "failover_streams": 4,
    "failover_max_tokens": 48,
    "kill_after_tokens": 12,
    "num_warmup": 1,
}
QUESTIONS = (
    "What is the main idea of the text above?",
    "Give the text a title.",
    "Which professions are mentioned?",
    "Summarize the text in one sentence.",
    "What season is described?",
    "List three objects that appear in the text.",
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# ---- servers --------------------------------------------------------------------------------


@dataclass(slots=True)
class Target:
    """One running `surge serve`: where it listens, the model it serves, its API process."""

    name: str
    base_url: str
    model: str
    api_pid: int
    info: dict[str, object] = field(default_factory=dict)  # command, startup time, for the JSON

    def options(self, ignore_eos: bool = True) -> RequestOptions:
        return RequestOptions(self.base_url, self.model, {"ignore_eos": True} if ignore_eos else {})

    def replicas(self) -> list[dict[str, object]]:
        """/health's replicas of the served model (index, state, core pid, ...)."""
        body = httpx.get(self.base_url + "/health", timeout=30).json()
        return list(body["engines"][self.model]["replicas"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(name: str, flags: list[str], args: argparse.Namespace) -> Iterator[Target]:
    """`surge serve` with `flags` (+ the args after `--`), ready; stopped by PID on exit."""
    cmd = [sys.executable, "-m", "surge.cli", "serve", *([args.model] if args.model else [])]
    cmd += ["--host", "127.0.0.1", "--port", "{port}", *flags, *args.serve_args]
    slug = "surge-" + "-".join(name.replace(",", "").split())  # names its log file
    server = ManagedServer(
        Baseline(slug, tuple(cmd), ready_path="/ready", ready_timeout=600), free_port()
    )
    try:
        started = time.perf_counter()
        try:
            server.wait_ready()
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{name}: {exc}\n{server.log_tail()}") from exc
        info = {"command": shlex.join(server.command), "log": str(server.log_path)}
        info["startup_s"] = round(time.perf_counter() - started, 1)
        target = Target(name, server.base_url, served_model(server.base_url), server.proc.pid, info)
        logger.info(
            "%s ready in %.1fs at %s (log %s)",
            name,
            info["startup_s"],
            target.base_url,
            server.log_path,
        )
        yield target
    finally:
        server.stop()


# ---- /metrics and /proc -----------------------------------------------------------------------


def scrape(base_url: str) -> Samples:
    """Every sample of /metrics by (name, sorted labels)."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def delta(after: Samples, before: Samples) -> Samples:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def series(samples: Samples, name: str, *labels: str) -> dict[str, float]:
    """Sample `name` summed by the given labels' values (joined with '/')."""
    out: dict[str, float] = {}
    for (sample, pairs), value in samples.items():
        if sample == name:
            d = dict(pairs)
            key = "/".join(d.get(label, "") for label in labels)
            out[key] = out.get(key, 0.0) + value
    return out


def wait_idle(base_url: str, timeout: float = 60.0) -> None:
    """Until no replica runs or queues a sequence (its last step's counters are then in)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = scrape(base_url)
        running = series(s, "surge:num_requests_running")
        waiting = series(s, "surge:num_requests_waiting")
        if sum(running.values()) + sum(waiting.values()) == 0:
            return
        time.sleep(0.2)
    logger.warning("%s not idle after %.0fs", base_url, timeout)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def router_shares(d: Samples) -> dict[str, object]:
    """Requests routed in a run: per replica (share) and per rule."""
    by_replica = series(d, "surge:router_decisions_total", "replica")
    total = sum(by_replica.values()) or 1.0
    return {
        "share": {r: round(n / total, 3) for r, n in sorted(by_replica.items())},
        "decisions": {
            k: int(v)
            for k, v in sorted(
                series(d, "surge:router_decisions_total", "replica", "reason").items()
            )
            if v
        },
    }


def finite(value: object) -> object:
    """NaN (a percentile of no samples) -> None, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


# ---- 1. shared prefixes, affinity on vs off ---------------------------------------------------


def shared_prefix_prompts(args: argparse.Namespace) -> list[Prompt]:
    """num_prefixes system prompts of ~prefix_words words, each shared by many short questions."""
    rng = random.Random(f"replicas:{args.seed}")
    systems = [
        f"You are reading assistant number {i}. Answer questions about this text.\n\n"
        + english_text(rng, args.prefix_words)
        for i in range(args.num_prefixes)
    ]
    order = [i % args.num_prefixes for i in range(args.prefix_requests)]
    rng.shuffle(order)
    return [
        Prompt(
            (("system", systems[k]), ("user", f"{rng.choice(QUESTIONS)} (question {n})")),
            args.prefix_max_tokens,
        )
        for n, k in enumerate(order)
    ]


def measure_prefix(target: Target, args: argparse.Namespace) -> dict[str, object]:
    """The shared-prefix workload on a fresh server (warmed with unrelated prompts)."""
    opts = target.options()
    asyncio.run(warm_up(opts, make_workload("short", 4, 16, args.seed), args.num_warmup))
    wait_idle(target.base_url)
    before = scrape(target.base_url)
    prompts = shared_prefix_prompts(args)
    results, seconds = asyncio.run(
        run_closed_loop(opts, prompts, args.prefix_concurrency, args.max_duration, target.name)
    )
    wait_idle(target.base_url)
    d = delta(scrape(target.base_url), before)
    hits = series(d, "surge:prefix_cache_hits_total", "replica")
    queries = series(d, "surge:prefix_cache_queries_total", "replica")
    stats = summarize(results, seconds, Slo())
    return {
        "num_requests": len(results),
        "errors": stats["errors"],
        "first_error": first_error(results),
        "duration_s": round(seconds, 2),
        "mean_prompt_tokens": stats["prompt_tokens"] / max(1, stats["completed"]),
        "ttft_p50_ms": stats["ttft_p50_ms"],
        "ttft_p95_ms": stats["ttft_p95_ms"],
        "e2e_p50_ms": stats["e2e_p50_ms"],
        "prefix_cache_hit_rate": sum(hits.values()) / sum(queries.values())
        if sum(queries.values())
        else None,
        "prefix_cache_hit_rate_per_replica": {
            r: hits.get(r, 0) / q for r, q in sorted(queries.items()) if q
        },
        "router": router_shares(d),
    }


# ---- 2. throughput, 1 vs 2 replicas -----------------------------------------------------------


def measure_throughput(target: Target, args: argparse.Namespace) -> dict[str, object]:
    """Closed loop at tput_concurrency, ignore_eos; tokens/s and the processes' CPU."""
    opts = target.options()
    prompts = make_workload("short", args.tput_requests, args.tput_max_tokens, args.seed)
    asyncio.run(warm_up(opts, prompts, args.num_warmup))
    wait_idle(target.base_url)
    cores = {str(r["replica"]): int(r["pid"]) for r in target.replicas() if r.get("pid")}
    pids = {"api": target.api_pid} | {f"core {i}": pid for i, pid in cores.items()}
    before = scrape(target.base_url)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    results, seconds = asyncio.run(
        run_closed_loop(opts, prompts, args.tput_concurrency, args.max_duration, target.name)
    )
    client_cpu = time.process_time() - client_before
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    d = delta(scrape(target.base_url), before)
    stats = summarize(results, seconds, Slo())
    tokens = max(1, int(stats["output_tokens"]))
    return {
        "num_requests": len(results),
        "errors": stats["errors"],
        "first_error": first_error(results),
        "duration_s": round(seconds, 2),
        "output_tokens": stats["output_tokens"],
        "output_tokens_per_s": stats["output_tokens_per_s"],
        "requests_per_s": stats["requests_per_s"],
        "ttft_p50_ms": stats["ttft_p50_ms"],
        "itl_p50_ms": stats["itl_p50_ms"],
        "api_cpu_s": round(cpu["api"], 3),
        "api_cpu_us_per_token": 1e6 * cpu["api"] / tokens,
        "api_cpu_utilisation": cpu["api"] / seconds,  # of one core
        "core_cpu_utilisation": {n: round(c / seconds, 3) for n, c in cpu.items() if n != "api"},
        "client_cpu_us_per_token": 1e6 * client_cpu / tokens,  # this script, same machine
        "loadavg_1m_at_end": os.getloadavg()[0],
        "router": router_shares(d),
    }


# ---- 3. failover ------------------------------------------------------------------------------


class TimedStream(StreamAccumulator):
    """A stream's accumulator that keeps every content chunk's arrival time and text."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self.times: list[float] = []
        self.pieces: list[str] = []
        self.started = asyncio.Event()  # first content, or the end

    def feed(self, payload: str, now: float) -> None:
        if payload.strip() != "[DONE]":
            for choice in json.loads(payload).get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    self.times.append(now)
                    self.pieces.append(content)
                    self.started.set()
        super().feed(payload, now)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def text_before(self, at: float) -> str:
        return "".join(p for t, p in zip(self.times, self.pieces, strict=True) if t <= at)


async def timed_stream(
    session: aiohttp.ClientSession, opts: RequestOptions, prompt: Prompt, acc: TimedStream
) -> RequestResult:
    """One greedy streaming chat request fed to `acc`; never raises."""
    body = {
        "model": opts.model,
        "messages": prompt.to_messages(),
        "max_tokens": prompt.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **opts.extra_body,
    }
    try:
        async with session.post(opts.base_url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                acc.result.error = f"HTTP {resp.status}: {(await resp.read())[:300]!r}"
            else:
                await read_events(resp, acc)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, OSError) as exc:
        acc.result.error = f"{type(exc).__name__}: {exc}"
    acc.started.set()
    return acc.finish(time.perf_counter())


def routed_to(before: Samples, after: Samples) -> str | None:
    """The one replica whose router count went up between two scrapes, else None."""
    up = [
        r
        for r, n in series(delta(after, before), "surge:router_decisions_total", "replica").items()
        if n
    ]
    return up[0] if len(up) == 1 else None


async def run_streams(
    target: Target, prompts: list[Prompt], kill_after: int | None
) -> dict[str, object]:
    """Start the streams one by one (noting each one's replica from the router's counters); with
    kill_after, SIGKILL the busiest replica's core once every stream has that many tokens."""
    opts = target.options()
    streams: list[TimedStream] = []
    tasks: list[asyncio.Task[RequestResult]] = []
    placed: list[str | None] = []
    kill: dict[str, object] = {}
    async with make_session(len(prompts) + 4) as session:
        last = await asyncio.to_thread(scrape, target.base_url)
        for prompt in prompts:
            acc = TimedStream(time.perf_counter())
            streams.append(acc)
            tasks.append(asyncio.create_task(timed_stream(session, opts, prompt, acc)))
            await asyncio.wait_for(acc.started.wait(), timeout=300)
            now = await asyncio.to_thread(scrape, target.base_url)
            placed.append(routed_to(last, now))
            last = now
        if kill_after is not None:
            kill = await kill_busiest(target, streams, tasks, placed, kill_after)
        results = await asyncio.gather(*tasks)
    return {"streams": streams, "results": results, "placed": placed, "kill": kill}


async def kill_busiest(
    target: Target,
    streams: list[TimedStream],
    tasks: list[asyncio.Task[RequestResult]],
    placed: list[str | None],
    kill_after: int,
) -> dict[str, object]:
    """Wait until every live stream has kill_after tokens, then SIGKILL the core holding most."""
    while any(
        len(s.times) < kill_after and not t.done() for s, t in zip(streams, tasks, strict=True)
    ):
        await asyncio.sleep(0.01)
    counts = {r: placed.count(r) for r in set(placed) if r is not None}
    victim = max(sorted(counts), key=lambda r: counts[r])
    replicas = await asyncio.to_thread(target.replicas)
    pid = next(int(r["pid"]) for r in replicas if str(r["replica"]) == victim)
    live = sum(not t.done() for t in tasks)
    kill_t = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    logger.info("killed replica %s (core pid %d) with %d streams in flight", victim, pid, live)
    return {"replica": victim, "pid": pid, "time": kill_t, "streams_in_flight": live}


async def wait_replica_back(
    target: Target, replica: str, old_pid: int, since: float, timeout: float
) -> float | None:
    """Seconds from `since` until `replica` is ready again with a new core; None on timeout."""
    while time.perf_counter() - since < timeout:
        for r in await asyncio.to_thread(target.replicas):
            if (
                str(r["replica"]) == replica
                and r["state"] == "ready"
                and r.get("pid") not in (None, old_pid)
            ):
                return time.perf_counter() - since
        await asyncio.sleep(0.2)
    return None


def token_gap(times: list[float], at: float) -> tuple[float, float] | None:
    """(last token before `at` -> next after, `at` -> next after), or None without both."""
    before = [t for t in times if t <= at]
    after = [t for t in times if t > at]
    return (after[0] - before[-1], after[0] - at) if before and after else None


def ms_percentiles(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": 1000 * percentile(values, 50),
        "p95_ms": 1000 * percentile(values, 95),
        "max_ms": 1000 * max(values) if values else math.nan,
    }


def measure_failover(target: Target, args: argparse.Namespace) -> dict[str, object]:
    """A reference run without a kill (greedy, for the texts), then the same streams with one."""
    prompts = make_workload("short", args.failover_streams, args.failover_max_tokens, args.seed + 1)
    asyncio.run(warm_up(target.options(), prompts, args.num_warmup))
    wait_idle(target.base_url)
    reference = None
    if args.failover_reference:
        ref = asyncio.run(run_streams(target, prompts, None))
        reference = [stream.text for stream in ref["streams"]]
        wait_idle(target.base_url)
    before = scrape(target.base_url)

    async def with_kill() -> tuple[dict[str, object], float | None]:
        run = await run_streams(target, prompts, args.kill_after_tokens)
        kill = run["kill"]
        back = await wait_replica_back(target, kill["replica"], kill["pid"], kill["time"], 180.0)
        return run, back

    run, restart_s = asyncio.run(with_kill())
    d = delta(scrape(target.base_url), before)
    return failover_report(run, restart_s, d, reference, args)


def first_difference(a: str, b: str) -> int | None:
    """The first index where two texts differ (None if equal)."""
    if a == b:
        return None
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def stream_details(
    streams: list[TimedStream], placed: list[str | None], kill_t: float, reference: list[str] | None
) -> list[dict[str, object]]:
    """Per stream: its replica, text received before the kill, where it left the reference."""
    details = []
    for i, (stream, replica) in enumerate(zip(streams, placed, strict=True)):
        row: dict[str, object] = {
            "replica": replica,
            "chunks_before_kill": sum(t <= kill_t for t in stream.times),
            "chars_before_kill": len(stream.text_before(kill_t)),
        }
        if reference is not None:
            at = first_difference(stream.text, reference[i])
            row["first_difference_char"] = at
            if at is not None:
                row["reference_at_difference"] = reference[i][max(0, at - 30) : at + 30]
                row["got_at_difference"] = stream.text[max(0, at - 30) : at + 30]
        details.append(row)
    return details


def failover_report(
    run: dict[str, object],
    restart_s: float | None,
    d: Samples,
    reference: list[str] | None,
    args: argparse.Namespace,
) -> dict[str, object]:
    """Gaps of the moved and the other streams, the checks, and the per-stream details."""
    kill, streams, results, placed = run["kill"], run["streams"], run["results"], run["placed"]
    moved, stayed = [], []
    for stream, replica in zip(streams, placed, strict=True):
        gap = token_gap(stream.times, kill["time"])
        if replica is not None and gap is not None:
            (moved if replica == kill["replica"] else stayed).append(gap)
    problems = [f"stream {i}: {r.error}" for i, r in enumerate(results) if not r.ok]
    problems += [
        f"stream {i}: {r.output_tokens} tokens, not {args.failover_max_tokens}"
        for i, r in enumerate(results)
        if r.ok and r.output_tokens != args.failover_max_tokens
    ]
    details = stream_details(streams, placed, kill["time"], reference)
    report: dict[str, object] = {
        "num_streams": len(streams),
        "streams_per_replica": {r: placed.count(r) for r in sorted({p for p in placed if p})},
        "unattributed_streams": placed.count(None),
        "killed_replica": kill["replica"],
        "streams_in_flight_at_kill": kill["streams_in_flight"],
        "affected_streams": len(moved),
        "gap_affected": ms_percentiles([g[0] for g in moved]),  # last token before -> next after
        "kill_to_next_token_affected": ms_percentiles([g[1] for g in moved]),
        "gap_unaffected": ms_percentiles([g[0] for g in stayed]),
        "failovers_counted": int(sum(series(d, "surge:request_failovers_total").values())),
        "replica_back_after_s": restart_s,
        "all_done_ok": not problems,
        "problems": problems[:10],
        "identical_to_reference": None,
        "streams": details,
    }
    if reference is not None:
        same = [row["first_difference_char"] is None for row in details]
        on_victim = [i for i, r in enumerate(placed) if r == kill["replica"]]
        report["identical_to_reference"] = {
            "moved": sum(same[i] for i in on_victim),
            "moved_of": len(on_victim),
            "others": sum(same) - sum(same[i] for i in on_victim),
            "others_of": len(streams) - len(on_victim),
        }
    return report


# ---- the run ----------------------------------------------------------------------------------


def attempt(into: dict[str, object], key: str, fn: Callable[[], dict[str, object]]) -> None:
    """into[key] = fn(), or the failure (the other measurements go on)."""
    # other work on the machine skews every number: keep the load it had when this part began
    load = {"loadavg_1m_at_start": os.getloadavg()[0]}
    try:
        into[key] = {"status": "ok"} | fn() | load
    except Exception as exc:  # one failed measurement must not lose the others
        logger.exception("%s failed", key)
        into[key] = {"status": "failed", "reason": str(exc)[-3000:]} | load


def run_all(args: argparse.Namespace) -> dict[str, object]:
    """Three servers in turn; each part's numbers under its own key."""
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    prefix: dict[str, object] = {}
    tput: dict[str, object] = {}
    failover: dict[str, object] = {}
    servers: dict[str, object] = {}
    plans = [
        (
            "2 replicas",
            ["--replicas", "2"],
            {1: (prefix, "affinity on"), 2: (tput, "2 replicas"), 3: (failover, "2 replicas")},
        ),
        (
            "2 replicas, affinity off",
            ["--replicas", "2", "--affinity-blocks", "0"],
            {1: (prefix, "affinity off"), 2: (tput, "2 replicas, affinity off")},
        ),
        ("1 replica", ["--replicas", "1"], {2: (tput, "1 replica")}),
    ]
    measure = {1: measure_prefix, 2: measure_throughput, 3: measure_failover}
    for name, flags, work in plans:
        todo = [(p, into, key) for p, (into, key) in work.items() if p in parts]
        if not todo:
            continue

        def one_server(
            flags: list[str] = flags, todo: list = todo, name: str = name
        ) -> dict[str, object]:
            with serving(name, flags, args) as target:
                for part, into, key in todo:
                    attempt(into, key, lambda part=part: measure[part](target, args))
                return target.info

        attempt(servers, name, one_server)
    return {"servers": servers, "prefix_affinity": prefix, "throughput": tput, "failover": failover}


def fmt(value: object, spec: str = ".1f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def _share(point: dict[str, object]) -> str:
    return " ".join(f"{r}:{x:.0%}" for r, x in point["router"]["share"].items())


def _rows(points: dict[str, dict], header: str, row: Callable[[dict], str]) -> list[str]:
    """A section: its header, then one line per point (or why it failed)."""
    lines = ["", header]
    for key, point in points.items():
        ok = point.get("status") == "ok"
        lines.append(f"   {key:<26} " + (row(point) if ok else f"FAILED: {point['reason'][:200]}"))
    return lines


def _prefix_row(p: dict) -> str:
    ttft = f"{fmt(p['ttft_p50_ms'], '.0f'):>8} {fmt(p['ttft_p95_ms'], '.0f'):>8}"
    hit = fmt(p["prefix_cache_hit_rate"], ".1%")
    return f"{ttft} {hit:>9}   {_share(p):<16} {p['errors']:>6}"


def _tput_row(t: dict) -> str:
    api = f"{fmt(t['api_cpu_us_per_token'], '.0f'):>9} {fmt(t['api_cpu_utilisation'], '.0%'):>8}"
    tput = f"{fmt(t['output_tokens_per_s']):>8} {fmt(t['ttft_p50_ms'], '.0f'):>8}"
    return f"{tput} {api}   {_share(t):<16} {t['errors']:>6}"


def _failover_lines(key: str, f: dict) -> list[str]:
    if f.get("status") != "ok":
        return ["", f"3. failover ({key}): FAILED: {f['reason'][:300]}"]
    g, k, u = f["gap_affected"], f["kill_to_next_token_affected"], f["gap_unaffected"]
    ok = "yes" if f["all_done_ok"] else "NO: " + "; ".join(f["problems"][:3])
    lines = [
        "",
        f"3. failover ({key}): killed replica {f['killed_replica']}'s core; streams per replica "
        f"{f['streams_per_replica']}; {f['affected_streams']} of {f['num_streams']} moved "
        f"(failover counter {f['failovers_counted']})",
        f"   token gap of the moved streams: p50 {fmt(g['p50_ms'], '.0f')} ms, p95 "
        f"{fmt(g['p95_ms'], '.0f')} ms, max {fmt(g['max_ms'], '.0f')} ms (kill -> next token p50 "
        f"{fmt(k['p50_ms'], '.0f')} ms); the other streams' gap p50 {fmt(u['p50_ms'], '.0f')} ms",
        f"   every stream ended with [DONE], no error, all its tokens: {ok}",
        f"   killed replica ready again after {fmt(f['replica_back_after_s'])} s",
    ]
    same = f["identical_to_reference"]
    if same:
        lines.append(
            f"   greedy text as without the kill: {same['moved']}/{same['moved_of']} moved, "
            f"{same['others']}/{same['others_of']} others"
        )
        left = [
            f"{row['first_difference_char']} ({row['chars_before_kill']})"
            for row in f["streams"]
            if row["replica"] == f["killed_replica"] and row["first_difference_char"] is not None
        ]
        if left:
            lines.append(
                f"   moved ones left it at char (chars received before the kill): {', '.join(left)}"
            )
    return lines


def table(result: dict[str, object]) -> str:
    """The printed summary."""
    lines = [f"CPU: {describe_cpu(result['machine'])}"]
    if result["prefix_affinity"]:
        header = (
            "1. shared prefixes, 2 replicas TTFT p50  p95 ms  hit rate   share per replica errors"
        )
        lines += _rows(result["prefix_affinity"], header, _prefix_row)
    if result["throughput"]:
        header = (
            "2. throughput                   tok/s  TTFT p50  API us/tok  API CPU   share   errors"
        )
        lines += _rows(result["throughput"], header, _tput_row)
    for key, f in result["failover"].items():
        lines += _failover_lines(key, f)
    for name, server in result["servers"].items():
        if server.get("status") != "ok":
            lines += ["", f"server {name} failed: {server.get('reason', '')[:300]}"]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--model",
        default="SmolLM2-135M-Instruct",
        help="the chat model (alone: no embedding model beside it)",
    )
    add("--parts", default="1,2,3", help="which measurements, comma list of 1, 2, 3")
    add("--seed", type=int, default=0)
    add("--quick", action="store_true", help="smoke test: every part with a few requests")
    add("--num-warmup", type=int, default=2, help="warm-up requests per server and part")
    add("--prefix-requests", type=int, default=128)
    add("--prefix-concurrency", type=int, default=16)
    add("--num-prefixes", type=int, default=8, help="distinct shared system prompts")
    add("--prefix-words", type=int, default=150, help="words per system prompt (~200 tokens)")
    add("--prefix-max-tokens", type=int, default=16)
    add("--tput-requests", type=int, default=96)
    add("--tput-concurrency", type=int, default=32)
    add("--tput-max-tokens", type=int, default=128)
    add("--failover-streams", type=int, default=16)
    add("--failover-max-tokens", type=int, default=256)
    add(
        "--max-duration",
        type=float,
        default=120.0,
        help="seconds of parts 1 and 2 after which no new request starts (a slow machine)",
    )
    add("--kill-after-tokens", type=int, default=64, help="kill once every stream has this many")
    add(
        "--failover-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first run the same greedy streams without a kill, to compare their texts",
    )
    add(
        "--output", default=None, help="JSON path (default benchmarks/results/replicas_<date>.json)"
    )
    add("serve_args", nargs="*", help="after `--`: arguments for every `surge serve`")
    args = parser.parse_args()
    if args.quick:  # quick sizes, but flags given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so the servers started here are stopped by PID.
    signal.signal(signal.SIGTERM, _interrupt)
    args = parse_args()
    result: dict[str, object] = {
        "version": RESULT_VERSION,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "config": {k: v for k, v in vars(args).items() if k != "output"},
    }
    logger.info("CPU: %s", describe_cpu(result["machine"]))
    result |= run_all(args)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    suffix = "_quick" if args.quick else ""
    output = Path(
        args.output or f"benchmarks/results/replicas{suffix}_{time.strftime('%Y-%m-%d')}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(finite(result), indent=1, default=str) + "\n")
    print(table(result))
    print(f"\nresults: {output}")
    groups = [
        result["servers"],
        result["prefix_affinity"],
        result["throughput"],
        result["failover"],
    ]
    failed = any(v.get("status") != "ok" for g in groups for v in g.values())
    failed |= any(not f.get("all_done_ok", True) for f in result["failover"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
