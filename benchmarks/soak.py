"""Soak test: many concurrent streams against a real `surge serve` for minutes, then checks that
every stream ended with [DONE] and that memory and KV usage went back to their baseline.

    python benchmarks/soak.py --minutes 10                          # bundled model, 256 streams
    python benchmarks/soak.py --model DIR --streams 64 --minutes 1 -- --threads 1 --dtype float32

Each of --streams workers sends streaming chat requests back to back (seeded random prompts and
lengths) until the time is up. Baselines are taken after a warm-up round, once the engine is idle;
"after" once it is idle again. Arguments after `--` go to `surge serve`. Exit status 0 when every
check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

WORDS = "the a river city light number seven blue quick answer question model server stream".split()


@dataclass(slots=True)
class Tally:
    """What the streams did, and the memory and load seen while they ran."""

    ok: int = 0
    errors: list[str] = field(default_factory=list)  # an error event, or not 200
    broken: list[str] = field(default_factory=list)  # no [DONE]: cut, timed out, bad JSON
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    peak_rss: dict[str, float] = field(default_factory=dict)
    peak_kv: float = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pid_running(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def server_children(api_pid: int) -> dict[str, int]:
    """The server's model processes (engine cores, encoder workers) by process title."""
    children = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != api_pid:
                continue
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError):
            continue
        if title.startswith("surge::"):
            children[f"{title.removeprefix('surge::')} {entry.name}"] = int(entry.name)
    if not children:
        raise RuntimeError("no engine core or worker process found")
    return children


def metrics(base_url: str) -> dict[str, float]:
    """/metrics samples by name, summed over labels (e.g. over models)."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            name = name.split("{")[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


def start_server(model: str | None, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`surge serve` on a free loopback port; returns once /ready says 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "surge.cli", "serve", *([model] if model else [])]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"surge serve exited with {proc.returncode}; log: {log}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=5).status_code == 200:
                return proc, base_url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"surge serve not ready after 600s; log: {log}")


def request_body(rng: random.Random, max_tokens: int) -> dict:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
    return {
        "messages": [{"role": "user", "content": words}],
        "max_tokens": rng.randint(8, max_tokens),
        "temperature": 0.8,
        "seed": rng.randrange(2**31),
        "ignore_eos": rng.random() < 0.5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """`data:` payloads, lines split on LF only as SSE says (httpx's aiter_lines also splits at
    U+0085/U+2028/U+2029, which JSON with ensure_ascii=False may carry raw)."""
    buffer = b""
    async for chunk in chunks:
        *lines, buffer = (buffer + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"data: "):
                yield line[6:].rstrip(b"\r").decode()


async def one_stream(client: httpx.AsyncClient, url: str, body: dict, tally: Tally) -> None:
    """Send one streaming request and file its outcome."""
    start, last, usage, error = time.monotonic(), None, None, None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                tally.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for last in sse_data(r.aiter_bytes()):
                if last != "[DONE]":
                    chunk = json.loads(last)
                    error = chunk.get("error", error)
                    usage = chunk.get("usage") or usage
    except (httpx.HTTPError, ValueError) as e:
        tally.broken.append(f"{type(e).__name__}: {e}"[:200])
        return
    if last != "[DONE]":
        tally.broken.append(f"no [DONE]; last event {last!r:.200}")
    elif error is not None:
        tally.errors.append(json.dumps(error)[:200])
    else:
        tally.ok += 1
        tally.tokens += usage["completion_tokens"] if usage else 0
        tally.latencies.append(time.monotonic() - start)


async def worker(
    base_url: str, seed: int, until: float, max_tokens: int, tally: Tally, at_least: int
) -> None:
    """Streams back to back until `until` (and at least `at_least` of them)."""
    rng = random.Random(seed)
    url = f"{base_url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=30)) as client:
        done = 0
        while done < at_least or time.monotonic() < until:
            await one_stream(client, url, request_body(rng, max_tokens), tally)
            done += 1


async def sample_forever(base_url: str, pids: dict[str, int], tally: Tally) -> None:
    """Track peak RSS and KV usage once a second."""
    while True:
        for name, pid in pids.items():
            tally.peak_rss[name] = max(tally.peak_rss.get(name, 0.0), rss_mib(pid))
        m = await asyncio.to_thread(metrics, base_url)
        tally.peak_kv = max(tally.peak_kv, m["surge:kv_cache_usage_perc"])
        await asyncio.sleep(1.0)


async def run_streams(
    base_url: str, args: argparse.Namespace, seconds: float, pids: dict[str, int], at_least: int = 0
) -> Tally:
    """args.streams workers for `seconds`, sampling memory and KV usage meanwhile."""
    tally = Tally()
    until = time.monotonic() + seconds
    sampler = asyncio.create_task(sample_forever(base_url, pids, tally))
    seeds = [args.seed * 100_003 + i for i in range(args.streams)]
    await asyncio.gather(
        *[worker(base_url, s, until, args.max_tokens, tally, at_least) for s in seeds]
    )
    sampler.cancel()
    return tally


def wait_idle(base_url: str, timeout: float = 120.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and no KV block is in use."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base_url)
        idle = m["surge:num_requests_running"] == 0 and m["surge:num_requests_waiting"] == 0
        if (idle and m["surge:kv_cache_usage_perc"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model dir or file (default: bundled)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rss-slack-mib", type=float, default=100.0, help="how far above baseline RSS may end"
    )
    parser.add_argument("serve_args", nargs="*", help="after `--`: arguments for `surge serve`")
    return parser.parse_args()


def soak(base_url: str, args: argparse.Namespace, pids: dict[str, int]) -> list[str]:
    """Warm up, take baselines, soak, compare; the failed checks."""
    warm = asyncio.run(run_streams(base_url, args, 0.0, pids, at_least=1))
    wait_idle(base_url)
    time.sleep(2.0)  # let freed memory settle before the baseline
    base = {name: rss_mib(pid) for name, pid in pids.items()}
    print(f"warm-up: {warm.ok} ok, {len(warm.errors) + len(warm.broken)} failed")

    start = time.monotonic()
    tally = asyncio.run(run_streams(base_url, args, args.minutes * 60, pids))
    elapsed = time.monotonic() - start
    idle = wait_idle(base_url)
    time.sleep(2.0)
    after = {name: rss_mib(pid) for name, pid in pids.items()}
    health = httpx.get(f"{base_url}/health", timeout=30)

    lat = sorted(tally.latencies) or [0.0]
    print(
        f"\n{args.streams} streams for {elapsed:.0f}s: {tally.ok} requests ended with [DONE], "
        f"{len(tally.errors)} errors, {len(tally.broken)} broken"
    )
    print(
        f"  {tally.ok / elapsed:.1f} req/s, {tally.tokens / elapsed:.0f} output tok/s, "
        f"latency p50 {statistics.median(lat):.2f}s, p99 {lat[int(0.99 * (len(lat) - 1))]:.2f}s"
    )
    for name in pids:
        print(
            f"  RSS {name}: baseline {base[name]:.0f} MiB, peak {tally.peak_rss[name]:.0f}, "
            f"after {after[name]:.0f} ({after[name] - base[name]:+.0f})"
        )
    kv_after = idle["surge:kv_cache_usage_perc"]
    print(f"  KV usage: peak {tally.peak_kv:.1%}, after {kv_after:.1%}")
    print(f"  /health {health.status_code} {health.text}")

    failures = [f"error: {e}" for e in tally.errors[:5]] + [
        f"broken: {b}" for b in tally.broken[:5]
    ]
    failures += [f"{len(tally.errors) + len(tally.broken)} streams failed"] if failures else []
    if tally.ok == 0:
        failures.append("no request completed")
    if kv_after != 0 or idle["surge:num_requests_running"] or idle["surge:num_requests_waiting"]:
        failures.append(f"the engine is not idle after the soak: {idle}")
    for name in pids:
        if after[name] - base[name] > args.rss_slack_mib:
            failures.append(f"{name} RSS {after[name] - base[name]:+.0f} MiB over its baseline")
    body = health.json()
    restarts = body.get("engine_restarts") or sum(
        e.get("restarts") or 0 for e in body.get("engines", {}).values()
    )
    if health.status_code != 200 or restarts:
        failures.append(f"unhealthy after the soak: {health.text}")
    return failures


def stop(proc: subprocess.Popen, pids: dict[str, int]) -> list[str]:
    """SIGTERM (drain and exit, as in production); the failed checks. Kills what is left."""
    proc.send_signal(signal.SIGTERM)
    failures = []
    try:
        code = proc.wait(timeout=60)
        print(f"  server exit status after SIGTERM: {code}")
        if code != 0:
            failures.append(f"server exited with {code} after SIGTERM")
    except subprocess.TimeoutExpired:
        failures.append("server still running 60s after SIGTERM")
    for pid in pids.values():
        if pid_running(pid):
            if pid != proc.pid:
                failures.append(f"process {pid} outlived the server")
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    return failures


def main() -> int:
    args = parse_args()
    log = Path(tempfile.mkstemp(prefix="surge-soak-", suffix=".log")[1])
    proc, base_url = start_server(args.model, args.serve_args, log)
    pids = {"api": proc.pid}
    failures: list[str] = []
    try:
        pids.update(server_children(proc.pid))
        print(f"server {base_url}, processes {pids}, log {log}")
        failures += soak(base_url, args, pids)
    finally:
        failures += stop(proc, pids)
    print("\nFAILED:\n  " + "\n  ".join(failures) if failures else "\nPASSED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
