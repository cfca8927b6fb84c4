"""Faults, end to end on real servers: stalled readers, a hung or crashing engine core, garbage
from the core, kill -9 mid-prefill and mid-queue, the restart breaker, SIGTERM to the process
group, and a core that must die with its parent.

No assertion is about wall-clock speed: each test waits for a condition (polling /metrics,
/health or /proc) with generous timeouts, and every client has a timeout far above what any
answer needs, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.reliability.faults_utils import (
    CLIENT_TIMEOUT_S,
    RESTART_WAIT_S,
    WAIT_S,
    FaultServer,
    StalledReader,
    WatchedStream,
    assert_engine_error,
    assert_stream_engine_error,
    drained_outcome,
    fault_server,
    group_members,
    pid_running,
    rss_mib,
    sse_post,
    stream_text,
    wait_for,
)
from tests.reliability.utils import error_shape_problem
from tests.server.conftest import TINY_ARGS

# A small KV cache: the tiny model needs little, and a core restart then allocates little.
BASE_ARGS = [*TINY_ARGS, "--kv-cache-memory", "64MiB"]
HANG, CRASH, GARBAGE = [7] * 8, [8] * 8, [9] * 8
FAULTS_ENV = {"SURGE_TEST_FAULTS": json.dumps({"hang": HANG, "crash": CRASH, "garbage": GARBAGE})}
STALLED = 'surge:request_aborted_total{reason="client_stalled"}'
RESTARTS = "surge:engine_restarts_total"


def prompt_ids(seed: int, length: int = 10) -> list[int]:
    """Token ids of a prompt that starts with no fault trigger (ids 20..319)."""
    return [20 + (seed * 7 + i) % 300 for i in range(length)]


P1, P3, P10 = prompt_ids(1), prompt_ids(3), prompt_ids(10)
P4_LONG = prompt_ids(4, 480)  # near the context (512): 480 prefill steps at 1 token a step


def completion(prompt: list[int], max_tokens: int, stream: bool = False, **extra: object) -> dict:
    """A greedy /v1/completions body that runs to max_tokens."""
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        **extra,
    }


def post(server: FaultServer, path: str, body: dict) -> httpx.Response:
    """POST a JSON body (a non-streaming request, or a refused stream)."""
    return httpx.post(server.url(path), json=body, timeout=CLIENT_TIMEOUT_S)


def metric(server: FaultServer, name: str) -> float:
    """One sample of /metrics (0 before it first counts)."""
    return server.metrics().get(name, 0.0)


def engine_load(server: FaultServer) -> tuple[float, float]:
    """(sequences running, sequences waiting) in the engine."""
    m = server.metrics()
    return m["surge:num_requests_running"], m["surge:num_requests_waiting"]


def serves_again(server: FaultServer) -> None:
    """After a recovery: a stream ends with [DONE] and a plain request answers 200."""
    text, finish = stream_text(
        sse_post(server.url("/v1/completions"), completion(prompt_ids(99), 8, stream=True))
    )
    assert finish == "length" and text
    r = post(server, "/v1/completions", completion(prompt_ids(98), 8))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


@pytest.fixture(scope="module")
def faulty(tiny_model_dir: Path) -> Iterator[FaultServer]:
    """A server whose core hangs, crashes or sends garbage on cue; one sequence at a time (the
    others queue) and a token budget of 1 per step, so prefill and decode take many steps: a
    window in which to act."""
    args = [
        *BASE_ARGS,
        "--engine-stall-timeout",
        "3",
        "--max-num-seqs",
        "1",
        "--max-num-batched-tokens",
        "1",
        # every test here crashes the core once: far from the breaker
        "--engine-max-restarts",
        "20",
    ]
    with fault_server(tiny_model_dir, args, FAULTS_ENV) as server:
        yield server


@pytest.fixture
def recovered(faulty: FaultServer) -> FaultServer:
    """The faulty server, ready (a test before may have left it restarting)."""
    faulty.wait_ready(RESTART_WAIT_S)
    return faulty


def results(futures: list[Future]) -> list:
    """Every future's result; none may take longer than a client's own timeout."""
    return [f.result(timeout=CLIENT_TIMEOUT_S + 30) for f in futures]


def restart_seconds(server: FaultServer, old_core: int, since: float) -> tuple[int, float]:
    """Wait for the restarted core; (its PID, seconds from `since` until ready) and print it."""
    new_core = server.restarted(old_core)
    took = time.monotonic() - since
    print(f"core {old_core} -> {new_core}: ready again {took:.1f}s after the fault")
    return new_core, took


# ---- 1. stalled readers ----------------------------------------------------------------------

# What 16 stalled readers may legitimately pin in the API process: per stream one merged output
# (4 choices x <=480 tokens x 21 logprobs, well under 10 MiB as Python objects) and uvicorn's
# 64 KiB write buffer; the core holds nothing per reader. A backlog of one output per engine
# step (or of unsent SSE chunks) would grow with every step instead: hundreds of MiB in seconds.
RSS_BOUND_MIB = 200


def test_stalled_readers_are_aborted_without_holding_memory(tiny_model_dir: Path) -> None:
    """16 streams whose clients never read: memory stays bounded, normal streams are served
    meanwhile, the stalled ones are aborted (KV and admission slots back), then all is well."""
    capacity = 80  # admission: 80 sequences at most, so a leaked slot shows as a 429
    args = [*BASE_ARGS, "--stream-read-timeout", "2", "--max-num-seqs", str(capacity)]
    with fault_server(tiny_model_dir, [*args, "--max-queue", "0"]) as server:
        api_pid, core_pid = server.proc.pid, server.core_pid()
        url = server.url("/v1/chat/completions")
        normal = [
            {
                "messages": [{"role": "user", "content": f"Count to {i}."}],
                "max_tokens": 24,
                "temperature": 0,
                "stream": True,
            }
            for i in range(4)
        ]
        alone = [stream_text(sse_post(url, body)) for body in normal]
        base = {"api": rss_mib(api_pid), "core": rss_mib(core_pid)}
        peak = dict(base)

        def sample() -> dict[str, float]:
            peak["api"] = max(peak["api"], rss_mib(api_pid))
            peak["core"] = max(peak["core"], rss_mib(core_pid))
            return server.metrics()

        # big chunks: 4 choices, 20 alternatives per token, up to the context, no early stop
        heavy = {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 480,
            "n": 4,
            "logprobs": True,
            "top_logprobs": 20,
            "ignore_eos": True,
            "stream": True,
        }
        readers = [StalledReader(server.port, "/v1/chat/completions", heavy) for _ in range(16)]
        try:
            wait_for(
                lambda: sample()["surge:num_requests_running"] >= 64,
                WAIT_S,
                "64 stalled sequences running",
            )
            with ThreadPoolExecutor(len(normal)) as pool:
                during = list(pool.map(lambda body: stream_text(sse_post(url, body)), normal))
            assert during == alone  # same greedy answers while the readers stall

            def all_aborted() -> bool:
                m = sample()
                return (
                    m.get(STALLED) == 16
                    and m["surge:num_requests_running"] == 0
                    and m["surge:kv_cache_usage_perc"] == 0
                )

            wait_for(all_aborted, WAIT_S, "16 client_stalled aborts and an idle engine")
            # the sockets are still open: their admission slots must be back (n = capacity)
            r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "n": capacity})
            assert r.status_code == 200, r.text
            sample()
        finally:
            for reader in readers:
                reader.close()
        print(
            f"RSS MiB: API {base['api']:.0f} -> peak {peak['api']:.0f} "
            f"(+{peak['api'] - base['api']:.0f}), core {base['core']:.0f} -> peak "
            f"{peak['core']:.0f} (+{peak['core'] - base['core']:.0f})"
        )
        assert peak["api"] - base["api"] < RSS_BOUND_MIB
        assert peak["core"] - base["core"] < RSS_BOUND_MIB
        status, health = server.engine_health()
        assert status == 200 and health["restarts"] == 0, health
        assert server.ready()[0] == 200
        assert metric(server, STALLED) == 16
        assert [stream_text(sse_post(url, body)) for body in normal] == alone


# ---- 2. a hung core --------------------------------------------------------------------------


def test_hung_core_is_killed_and_restarted(recovered: FaultServer) -> None:
    """A core that stops stepping: after --engine-stall-timeout every in-flight request ends with
    an error naming the stall, the core is replaced, /health says why, and requests work again."""
    server = recovered
    old_core, restarts = server.core_pid(), metric(server, RESTARTS)
    with ThreadPoolExecutor(3) as pool:
        # 4 choices one after another: seconds of work, so both are surely in flight below
        stream = WatchedStream(pool, server.url("/v1/completions"), completion(P1, 480, True, n=4))
        stream.wait_first_token()
        plain = pool.submit(post, server, "/v1/completions", completion(prompt_ids(2), 480))
        wait_for(lambda: engine_load(server) == (1, 4 - stream.num_finished), WAIT_S, "the queue")
        hung_at = time.monotonic()
        trigger = pool.submit(post, server, "/v1/completions", completion(HANG + [20, 21], 4))
        plain_r, trigger_r = results([plain, trigger])
        events = stream.events()
    assert stream.num_finished < 4
    for message in (
        assert_stream_engine_error(events, "stalled"),
        assert_engine_error(plain_r, "stalled"),
        assert_engine_error(trigger_r, "stalled"),
    ):
        print(f"hung core: {message}")
    new_core, _ = restart_seconds(server, old_core, hung_at)
    assert new_core != old_core and not pid_running(old_core)
    status, health = server.engine_health()
    assert status == 200 and health["status"] == "ok", health
    assert "stalled" in health["last_failure"], health
    assert metric(server, RESTARTS) == restarts + 1 == health["restarts"]
    serves_again(server)


# ---- 3. garbage from the core ----------------------------------------------------------------


def test_garbage_frame_is_treated_as_a_crash(recovered: FaultServer) -> None:
    """Bytes the front end can't decode break its output loop: that is a crash (requests fail
    with an error, the core is killed and restarted), never a silent hang."""
    server = recovered
    old_core, restarts = server.core_pid(), metric(server, RESTARTS)
    with ThreadPoolExecutor(2) as pool:
        stream = WatchedStream(pool, server.url("/v1/completions"), completion(P3, 480, True, n=4))
        stream.wait_first_token()
        sent_at = time.monotonic()
        trigger = pool.submit(post, server, "/v1/completions", completion(GARBAGE + [20], 4))
        (trigger_r,) = results([trigger])
        events = stream.events()
    assert stream.num_finished < 4
    print(f"garbage: {assert_stream_engine_error(events, 'output loop failed')}")
    assert_engine_error(trigger_r, "output loop failed")
    new_core, _ = restart_seconds(server, old_core, sent_at)
    wait_for(lambda: not pid_running(old_core), WAIT_S, "the old core gone")
    status, health = server.engine_health()
    assert status == 200 and "output loop failed" in health["last_failure"], health
    assert metric(server, RESTARTS) == restarts + 1
    serves_again(server)


# ---- 4. kill -9 of the core ------------------------------------------------------------------


def test_kill_core_mid_prefill(recovered: FaultServer) -> None:
    """kill -9 while a 480-token prompt is being prefilled (1 token a step) and another waits
    for it: both requests, streaming and not, end with an explicit error; the core comes back."""
    server = recovered
    old_core = server.core_pid()
    with ThreadPoolExecutor(2) as pool:
        stream = WatchedStream(pool, server.url("/v1/completions"), completion(P4_LONG, 8, True))
        plain = pool.submit(post, server, "/v1/completions", completion(prompt_ids(5, 480), 8))
        wait_for(lambda: engine_load(server) == (1, 1), WAIT_S, "a prompt prefilling, one waiting")
        os.kill(old_core, signal.SIGKILL)
        killed_at = time.monotonic()
        (plain_r,) = results([plain])
        events = stream.events()
    # no token before the error: the kill came while the prompt was still being prefilled
    assert not stream.first_token.is_set(), "prefill finished before the kill: window missed"
    print(f"killed mid-prefill: {assert_stream_engine_error(events, 'engine core')}")
    assert_engine_error(plain_r, "engine core")
    restart_seconds(server, old_core, killed_at)
    serves_again(server)


def test_kill_core_with_requests_queued(recovered: FaultServer) -> None:
    """kill -9 with requests waiting behind a running one (one sequence at a time): all, streaming
    and not, end with an explicit error; none hangs; the core comes back and serves."""
    server = recovered
    old_core = server.core_pid()
    url = server.url("/v1/completions")
    with ThreadPoolExecutor(5) as pool:
        # 8 choices, one after another: the queue below stays put for seconds
        running = WatchedStream(pool, url, completion(P10, 480, True, n=8))
        running.wait_first_token()
        streams = [WatchedStream(pool, url, completion(prompt_ids(i), 4, True)) for i in (11, 12)]
        plain = [
            pool.submit(post, server, "/v1/completions", completion(prompt_ids(i), 4))
            for i in (13, 14)
        ]
        wait_for(
            lambda: engine_load(server) == (1, 7 - running.num_finished + 4),
            WAIT_S,
            "one running and four requests waiting",
        )
        os.kill(old_core, signal.SIGKILL)
        killed_at = time.monotonic()
        plain_rs = results(plain)
        events = [s.events() for s in (running, *streams)]
    assert running.num_finished < 8
    for stream_events in events:
        assert_stream_engine_error(stream_events, "engine core")
    for r in plain_rs:
        assert_engine_error(r, "engine core")
    restart_seconds(server, old_core, killed_at)
    serves_again(server)


# ---- 5. the restart breaker ------------------------------------------------------------------


def test_breaker_opens_after_too_many_crashes(tiny_model_dir: Path) -> None:
    """--engine-max-restarts 1: the first crash is restarted, the second is not; from then on
    /ready and /health say 503 with the reason, and requests get 503 with OpenAI's body."""
    args = [*BASE_ARGS, "--engine-max-restarts", "1"]
    with fault_server(tiny_model_dir, args, FAULTS_ENV) as server:
        old_core = server.core_pid()
        crashed_at = time.monotonic()
        assert_engine_error(post(server, "/v1/completions", completion(CRASH + [20], 4)))
        new_core, _ = restart_seconds(server, old_core, crashed_at)
        serves_again(server)
        assert_engine_error(post(server, "/v1/completions", completion(CRASH + [21], 4)))
        wait_for(lambda: server.health()[0] == 503, WAIT_S, "/health 503")
        wait_for(lambda: not pid_running(new_core), WAIT_S, "the crashed core gone")
        # It stays so (a crash loop must not come back by itself): look again a few times,
        # with requests in between that must not bring the engine back either.
        problems: list[str] = []
        for i in range(6):
            status, health = server.engine_health()
            if (
                status != 503
                or health["status"] != "failed"
                or "not restarted" not in str(health["reason"])
            ):
                problems.append(f"look {i}: /health {status} {health}")
            status, ready = server.ready()
            if status != 503 or "not restarted" not in ready["reason"]:
                problems.append(f"look {i}: /ready {status} {ready}")
            for stream in (False, True):
                r = post(server, "/v1/completions", completion(prompt_ids(i), 4, stream=stream))
                if r.status_code != 503 or error_shape_problem(r.content) is not None:
                    body = r.text.replace("\n", " ")[:160]
                    problems.append(f"look {i}: stream={stream} -> {r.status_code} {body}")
            time.sleep(1.0)
        assert not problems, "\n".join(problems)
        assert metric(server, RESTARTS) == 1
        assert server.proc.poll() is None  # the API process stays up to answer 503s


# ---- 6. SIGTERM to the whole process group ---------------------------------------------------


def test_sigterm_to_process_group_drains_and_exits(tiny_model_dir: Path) -> None:
    """`kill -TERM -PGID` (what systemd and docker do) under load: every accepted request either
    finishes (stop/length) or ends with an explicit error (stream: error event, then [DONE]);
    none hangs; the server exits 0; nothing of the process group remains."""
    grace = 1.0
    # One token a step: 18 requests of 480 tokens need thousands of steps, far more than the
    # grace period, so the drain surely ends by cutting requests (the case to check here; the
    # one where all finish in time is tests/server/test_shutdown.py).
    args = [*BASE_ARGS, "--shutdown-grace", str(grace), "--max-num-batched-tokens", "1"]
    server = FaultServer(tiny_model_dir, args, new_session=True)
    try:
        pgid = os.getpgid(server.proc.pid)
        assert pgid == server.proc.pid != os.getpgid(0)
        core = server.core_pid()
        url = server.url("/v1/completions")
        with ThreadPoolExecutor(18) as pool:
            streams = [
                WatchedStream(pool, url, completion(prompt_ids(i), 480, True)) for i in range(16)
            ]
            plain = [
                pool.submit(post, server, "/v1/completions", completion(prompt_ids(i), 480))
                for i in (16, 17)
            ]
            for stream in streams:
                stream.wait_opened()

            def all_admitted() -> bool:
                done = sum(s.num_finished for s in streams) + sum(f.done() for f in plain)
                return sum(engine_load(server)) + done == 18

            wait_for(all_admitted, WAIT_S, "18 requests in the engine")
            wait_for(lambda: any(s.first_token.is_set() for s in streams), WAIT_S, "a token")
            os.killpg(pgid, signal.SIGTERM)
            signalled_at = time.monotonic()
            outcomes: list[tuple[str, list[str] | httpx.Response]] = [
                *(("stream", s.events()) for s in streams),
                *(("plain", r) for r in results(plain)),
            ]
        exit_code = server.proc.wait(timeout=grace + WAIT_S)
        print(
            f"SIGTERM to the group: exit {exit_code} after {time.monotonic() - signalled_at:.1f}s"
        )
        assert exit_code == 0, server.read_log()
        wait_for(lambda: not pid_running(core), WAIT_S, "the core gone")
        wait_for(lambda: not group_members(pgid), WAIT_S, "an empty process group")
        counts = {"finished": 0, "error": 0}
        wrong = []
        for kind, outcome in outcomes:
            verdict = drained_outcome(outcome)
            if verdict in counts:
                counts[verdict] += 1
            else:
                wrong.append(f"{kind}: {verdict}")
        print(f"SIGTERM to the group: {counts}, neither: {len(wrong)}")
        assert not wrong, "\n".join(wrong)
    finally:
        server.close()


# ---- 7. the core dies with its parent --------------------------------------------------------


def test_core_never_outlives_its_parent(tiny_model_dir: Path) -> None:
    """SIGKILL of the API process (no chance to clean up): the core goes too."""
    server = FaultServer(tiny_model_dir, BASE_ARGS)
    try:
        core = server.core_pid()
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=WAIT_S)
        wait_for(lambda: not pid_running(core), 30, "the orphaned core gone")
    finally:
        server.close()
