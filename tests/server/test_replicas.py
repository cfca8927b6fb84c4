"""Replicas of one chat model inside one `surge serve`: kill -9 of a replica's core mid-stream, a
hung replica, scaling 1 -> 3 -> 1 under load through the admin API, placement refused past the
CPU count, and per-replica metrics.

Greedy float32 outputs of the tiny random model are exactly reproducible, so every stream that
lives through a failover is compared token for token with the same request run undisturbed on
the same server. No assertion is about wall-clock speed: each step waits for a condition
(/health, /metrics, a stream's progress) under a generous hang guard, and where a failover must
happen it is made certain (a core that holds queued sequences is killed, or hangs), not raced.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.encoders.tiny_encoders import make_tiny_embedding_dir
from tests.reliability.faults_utils import (
    CLIENT_TIMEOUT_S,
    RESTART_WAIT_S,
    WAIT_S,
    FaultServer,
    pid_running,
    sse_data,
    wait_for,
)
from tests.server.conftest import TINY_ARGS
from tests.server.utils import free_port

pytestmark = pytest.mark.timeout(600)

BASE_ARGS = [*TINY_ARGS, "--kv-cache-memory", "64MiB", "--no-replica-pinning"]
HANG = [7, 7, 7, 7]  # the fault hook's trigger: a prompt starting with these ids hangs its core
ADMIN_KEY = "sk-admin-replicas"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SESSION_HEADER = "X-Session-Id"
FAILOVERS = "surge:request_failovers_total"
ROUTED = "surge:router_decisions_total"


def prompt_text(i: int) -> str:
    """Varied prompts (length and content) that the tiny tokenizer knows."""
    words = (
        "the quick brown fox jumps over lazy dog Paris capital France Berlin users server".split()
    )
    return f"{i}: " + " ".join(words[(i * 5 + k) % len(words)] for k in range(3 + i % 9))


def fault_env(once_dir: Path) -> dict[str, str]:
    """The hang fault, firing in one core only (a moved request must not hang the next one)."""
    return {"SURGE_TEST_FAULTS": json.dumps({"hang": HANG, "once_dir": str(once_dir)})}


# ---- requests and their outputs ------------------------------------------------------------


def completion_body(prompt: str | list[int], max_tokens: int, stream: bool = True) -> dict:
    """Greedy, to max_tokens, with each token's text and logprob (logprobs=0)."""
    body: dict = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass(frozen=True)
class Completion:
    """What a client got: text, each token's text and logprob, finish_reason, usage, errors."""

    text: str
    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    finish_reason: str | None
    completion_tokens: int | None
    errors: tuple[dict, ...] = ()


def read_stream(events: list[str]) -> Completion:
    """A finished single-choice completions stream; it must end with [DONE]."""
    assert events and events[-1] == "[DONE]", events[-3:]
    text, tokens, logprobs, finish, used, errors = "", [], [], None, None, []
    for event in events[:-1]:
        chunk = json.loads(event)
        if "error" in chunk:
            errors.append(chunk["error"])
            continue
        if chunk.get("usage"):
            used = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            text += choice["text"]
            if choice.get("logprobs"):
                tokens += choice["logprobs"]["tokens"]
                logprobs += choice["logprobs"]["token_logprobs"]
            finish = choice.get("finish_reason") or finish
    return Completion(text, tuple(tokens), tuple(logprobs), finish, used, tuple(errors))


def read_response(r: httpx.Response) -> Completion:
    """A non-streaming completion; it must be a 200."""
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    return Completion(
        choice["text"],
        tuple(lp["tokens"]),
        tuple(lp["token_logprobs"]),
        choice["finish_reason"],
        body["usage"]["completion_tokens"],
    )


def assert_ran_to_length(got: Completion, max_tokens: int) -> None:
    """Ended normally at max_tokens, each token counted once, no error event."""
    assert not got.errors, got.errors
    assert got.finish_reason == "length", got
    assert got.completion_tokens == max_tokens, got
    assert len(got.tokens) == len(got.logprobs) == max_tokens, got


def assert_same(got: Completion, want: Completion) -> None:
    """The same greedy output token for token (logprobs may differ in the last bits: the batch
    around it differs)."""
    assert not got.errors, got.errors
    assert (got.text, got.tokens, got.finish_reason, got.completion_tokens) == (
        want.text,
        want.tokens,
        want.finish_reason,
        want.completion_tokens,
    )
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-3)


def num_tokens(event: str) -> int:
    """Tokens an SSE chunk of a completions stream with logprobs carries (text may lag them)."""
    if event == "[DONE]":
        return 0
    choices = json.loads(event).get("choices", [])
    return sum(len((c.get("logprobs") or {}).get("tokens", ())) for c in choices)


class LiveStream:
    """A streaming request on a pool thread; counts the tokens it has received so far."""

    def __init__(
        self, pool: ThreadPoolExecutor, url: str, body: dict, session: str | None = None
    ) -> None:
        self.num_tokens = 0
        headers = {SESSION_HEADER: session} if session else {}
        self._future: Future[list[str]] = pool.submit(self._run, url, body, headers)

    def _run(self, url: str, body: dict, headers: dict[str, str]) -> list[str]:
        events: list[str] = []
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
            with client.stream("POST", url, json=body, headers=headers) as r:
                if r.status_code != 200:
                    r.read()
                    raise AssertionError(f"HTTP {r.status_code} {r.text}")
                for event in sse_data(r.iter_bytes()):
                    events.append(event)
                    self.num_tokens += num_tokens(event)
        return events

    def result(self) -> Completion:
        return read_stream(self._future.result(timeout=CLIENT_TIMEOUT_S + 30))


def run_streams(
    pool: ThreadPoolExecutor, url: str, jobs: list[tuple[str | list[int], int, str | None]]
) -> list[Completion]:
    """(prompt, max_tokens, session) streams, all at once; their outputs in order."""
    streams = [LiveStream(pool, url, completion_body(p, n), s) for p, n, s in jobs]
    return [s.result() for s in streams]


# ---- the server ----------------------------------------------------------------------------


class ReplicaServer(FaultServer):
    """A FaultServer with the one chat model's replicas from /health and labelled metrics."""

    @property
    def chat_model(self) -> str:
        models = httpx.get(self.url("/v1/models"), timeout=10).json()["data"]
        return next(m["id"] for m in models if m["kind"] == "chat")

    def engine(self) -> dict:
        """/health's view of the chat model: restarts, failovers, replicas."""
        return self.health()[1]["engines"][self.chat_model]

    def replicas(self) -> dict[int, dict]:
        return {r["replica"]: r for r in self.engine()["replicas"]}

    def wait_replicas(self, indexes: list[int], timeout: float = RESTART_WAIT_S) -> dict[int, dict]:
        """Wait until the replicas are exactly `indexes`, all ready; their /health entries."""

        def ready() -> dict[int, dict] | None:
            now = self.replicas()
            ok = sorted(now) == indexes and all(r["state"] == "ready" for r in now.values())
            return now if ok else None

        return wait_for(ready, timeout, f"replicas {indexes} ready", self.read_log)

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of one metric: (labels, value)."""
        out = []
        for line in httpx.get(self.url("/metrics"), timeout=10).text.splitlines():
            m = re.fullmatch(r"([^{\s]+)(?:\{(.*)\})? (\S+)", line)
            if m and m.group(1) == name:
                out.append((dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")), float(m[3])))
        return out

    def total(self, name: str, **labels: str) -> float:
        """A metric summed over the samples whose labels include `labels`."""
        return sum(v for lab, v in self.samples(name) if labels.items() <= lab.items())

    def full_log(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def session_on(self, index: int, prefix: str) -> str:
        """A session the router now sends to replica `index`. A session goes where it was served
        last: each new name is served once (by load) and once more, the second time as an
        "affinity" decision that says where (sessions are the only affinity keys in flight)."""
        url = self.url("/v1/completions")
        for k in range(50):
            session = f"{prefix}-{k}"
            before = self.samples(ROUTED)
            for _ in range(2):
                r = httpx.post(
                    url,
                    json=completion_body("hi", 1, stream=False),
                    headers={SESSION_HEADER: session},
                    timeout=CLIENT_TIMEOUT_S,
                )
                assert r.status_code == 200, r.text
            hits = _increased(before, self.samples(ROUTED), reason="affinity")
            if hits == [str(index)]:
                return session
        raise AssertionError(f"no session routed to replica {index}")


def _increased(
    before: list[tuple[dict[str, str], float]],
    after: list[tuple[dict[str, str], float]],
    reason: str,
) -> list[str]:
    """The replicas whose count of routing decisions for `reason` went up."""
    old = {lab["replica"]: v for lab, v in before if lab.get("reason") == reason}
    return sorted(
        lab["replica"]
        for lab, v in after
        if lab.get("reason") == reason and v > old.get(lab["replica"], 0.0)
    )


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path) -> Iterator[ReplicaServer]:
    """Two replicas sharing the CPUs, 4 sequences at a time each; sessions always go to their
    replica (no load guard), so a test knows where each of its streams runs."""
    args = [*BASE_ARGS, "--replicas", "2", "--max-num-seqs", "4", "--affinity-margin", "1000"]
    server = ReplicaServer(tiny_model_dir, args)
    try:
        server.wait_replicas([0, 1])
        yield server
    finally:
        server.close()


# ---- 1. kill -9 of one replica's core ------------------------------------------------------

VICTIM = 0
MOVED = re.compile(r"moved \S+ from replica (\d+) to (\d+) after (\d+) tokens")


def test_kill_9_of_a_replica_core_mid_stream(pair: ReplicaServer) -> None:
    """32 greedy streams over 2 replicas (the cores paused until all are routed, so each holds
    its 16 at once); one core is killed as soon as one of its streams has a token: every stream
    ends with [DONE], no error event, the same tokens as undisturbed, usage counted once;
    requests sent while the replica restarts answer 200; it comes back with a new core."""
    server = pair
    url = server.url("/v1/completions")
    replicas0 = server.wait_replicas([0, 1])
    failovers0 = server.total(FAILOVERS)
    log0 = len(server.full_log())
    # 32 streams, max_tokens 40..56, alternately on replica 0 and 1 (by session)
    sessions = [server.session_on(i, f"kill{i}") for i in (0, 1)]
    jobs = [(prompt_text(i), 40 + i % 17, sessions[i % 2]) for i in range(32)]
    with ThreadPoolExecutor(len(jobs) + 8) as pool:
        alone = run_streams(pool, url, jobs)
        for got, (_, max_tokens, _) in zip(alone, jobs, strict=True):
            assert_ran_to_length(got, max_tokens)
        assert len({c.text for c in alone}) > 16  # the prompts tell the outputs apart

        # both cores stopped until all 32 are routed: each core then holds its 16 at once
        pids = [replicas0[i]["pid"] for i in (0, 1)]
        routed0 = server.total(ROUTED)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            streams = [LiveStream(pool, url, completion_body(p, n), s) for p, n, s in jobs]
            wait_for(lambda: server.total(ROUTED) == routed0 + 32, WAIT_S, "32 streams routed")
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        on_victim = streams[VICTIM::2]
        wait_for(
            lambda: any(s.num_tokens for s in on_victim),
            WAIT_S,
            f"a token from replica {VICTIM}",
            server.read_log,
        )
        old_pid = replicas0[VICTIM]["pid"]
        os.kill(old_pid, signal.SIGKILL)
        wait_for(
            lambda: (
                server.replicas()[VICTIM]["state"] != "ready"
                or server.replicas()[VICTIM]["pid"] != old_pid
            ),
            WAIT_S,
            "the killed core noticed",
            server.read_log,
        )
        # sent while the replica restarts: the other one answers them
        during = [
            pool.submit(
                httpx.post, url, json=completion_body(p, n, stream=False), timeout=CLIENT_TIMEOUT_S
            )
            for p, n, _ in jobs[:4]
        ]
        got = [s.result() for s in streams]
        got_during = [read_response(f.result(timeout=CLIENT_TIMEOUT_S + 30)) for f in during]

    for g, want, (_, max_tokens, _) in zip(got, alone, jobs, strict=True):
        assert_ran_to_length(g, max_tokens)
        assert_same(g, want)
    for g, want in zip(got_during, alone, strict=False):
        assert_same(g, want)

    moved = [tuple(map(int, m)) for m in MOVED.findall(server.full_log()[log0:])]
    print("moved (from, to, tokens):", moved)
    assert server.total(FAILOVERS) - failovers0 == len(moved) > 0
    assert all((src, dst) == (VICTIM, 1 - VICTIM) for src, dst, _ in moved), moved
    assert any(tokens > 0 for _, _, tokens in moved), moved  # moved mid-stream

    after = server.wait_replicas([0, 1])
    back = after[VICTIM]
    assert back["restarts"] == replicas0[VICTIM]["restarts"] + 1, after
    assert back["pid"] not in (None, old_pid), after
    assert f"process {old_pid} exited" in back["last_failure"], after
    other = after[1 - VICTIM]
    assert (other["pid"], other["restarts"]) == (
        replicas0[1 - VICTIM]["pid"],
        replicas0[1 - VICTIM]["restarts"],
    )
    assert server.engine()["failovers"] == server.total(FAILOVERS)


# ---- 5. per-replica metrics; a bad request leaves replicas alone ---------------------------


def test_metrics_per_replica_and_bad_requests_leave_replicas_alone(pair: ReplicaServer) -> None:
    """/metrics labels the engine gauges by replica; 400s change no replica's state or core."""
    server = pair
    server.wait_replicas([0, 1])
    running = server.samples("surge:num_requests_running")
    assert sorted(labels["replica"] for labels, _ in running) == ["0", "1"], running
    assert sorted(lab["replica"] for lab, _ in server.samples("surge:replica_ready")) == ["0", "1"]
    assert server.total("surge:replica_ready") == 2
    assert server.total("surge:replica_breaker_open") == 0

    def snapshot() -> list[tuple]:
        return [
            (i, r["state"], r["pid"], r["restarts"], r["last_failure"])
            for i, r in sorted(server.replicas().items())
        ]

    before, routed = snapshot(), server.total(ROUTED)
    url = server.url("/v1/completions")
    bad = [
        {"prompt": "hi", "max_tokens": -1},
        {"prompt": "hi", "max_tokens": 8, "temperature": -1},
        {"prompt": [10**6], "max_tokens": 8},  # no such token id
        {"prompt": "hi", "max_tokens": 100_000},  # past the context
        {"prompt": "hi", "max_tokens": 8, "stream": True, "n": 0},
    ]
    for body in bad:
        r = httpx.post(url, json=body, timeout=CLIENT_TIMEOUT_S)
        assert r.status_code == 400, (body, r.status_code, r.text)
    assert snapshot() == before
    assert server.total(ROUTED) == routed  # none reached a replica
    good = read_response(
        httpx.post(url, json=completion_body("hi", 8, stream=False), timeout=CLIENT_TIMEOUT_S)
    )
    assert_ran_to_length(good, 8)
    assert snapshot() == before


# ---- 2. a hung replica ---------------------------------------------------------------------


def test_hung_replica_is_detected_and_its_streams_fail_over(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A core hangs (fault hook, once across cores) with streams on it: the stall watchdog kills
    it, its streams continue on the other replica with the right tokens, and it restarts."""
    args = [*BASE_ARGS, "--replicas", "2", "--engine-stall-timeout", "3"]
    server = ReplicaServer(tiny_model_dir, args, fault_env(tmp_path))
    try:
        replicas0 = server.wait_replicas([0, 1])
        url = server.url("/v1/completions")
        hung = 0
        hung_session = server.session_on(hung, "hung")
        calm_session = server.session_on(1 - hung, "calm")
        jobs = [(prompt_text(40 + i), 48, hung_session) for i in range(3)]
        jobs += [(prompt_text(50 + i), 48, calm_session) for i in range(3)]
        trigger = [*HANG, *range(30, 40)]

        with ThreadPoolExecutor(len(jobs) + 2) as pool:
            alone = run_streams(pool, url, jobs)
            for got in alone:
                assert_ran_to_length(got, 48)
            routed0 = server.total(ROUTED, replica=str(hung))
            affinity0 = server.total(ROUTED, replica=str(hung), reason="affinity")
            failovers0 = server.total(FAILOVERS)
            # the trigger first: once it is routed it is in the core's queue, ahead of the rest
            trigger_stream = LiveStream(pool, url, completion_body(trigger, 48), hung_session)
            wait_for(
                lambda: server.total(ROUTED, replica=str(hung), reason="affinity") > affinity0,
                WAIT_S,
                "the trigger routed to its session's replica",
                server.read_log,
            )
            streams = [LiveStream(pool, url, completion_body(p, n), s) for p, n, s in jobs]
            got = [s.result() for s in streams]
            got_trigger = trigger_stream.result()

        for g, want in zip(got, alone, strict=True):
            assert_ran_to_length(g, 48)
            assert_same(g, want)
        assert_ran_to_length(got_trigger, 48)
        # every sequence placed on the hung core (the trigger, and those of its session that
        # reached it before it was found stuck) moved; none of the other replica's did
        routed_hung = server.total(ROUTED, replica=str(hung)) - routed0
        assert 1 <= server.total(FAILOVERS) - failovers0 == routed_hung

        after = server.wait_replicas([0, 1])
        assert after[hung]["restarts"] == replicas0[hung]["restarts"] + 1, after
        assert after[hung]["pid"] != replicas0[hung]["pid"], after
        assert "stalled" in after[hung]["last_failure"], after
        assert after[1 - hung]["pid"] == replicas0[1 - hung]["pid"], after
        assert after[1 - hung]["restarts"] == replicas0[1 - hung]["restarts"], after
    finally:
        server.close()


# ---- 3. scaling 1 -> 3 -> 1 under load ------------------------------------------------------

TRAFFIC_JOBS = [(prompt_text(60 + i), 32 + 4 * i) for i in range(6)]


class Traffic:
    """Worker threads that send streams one after another (each worker its own prompts in turn)
    until stopped; every outcome is kept with its prompt's index."""

    def __init__(self, url: str, num_workers: int) -> None:
        self.url = url
        self.done: list[int] = [0] * num_workers  # streams finished, per worker
        self.outcomes: list[tuple[int, Completion | BaseException]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(w,), daemon=True) for w in range(num_workers)
        ]
        for t in self._threads:
            t.start()

    def _work(self, worker: int) -> None:
        k = worker
        while not self._stop.is_set():
            job = k % len(TRAFFIC_JOBS)
            prompt, max_tokens = TRAFFIC_JOBS[job]
            try:
                events: list[str] = []
                with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
                    body = completion_body(prompt, max_tokens)
                    with client.stream("POST", self.url, json=body) as r:
                        if r.status_code != 200:
                            r.read()
                            raise AssertionError(f"HTTP {r.status_code} {r.text}")
                        events = list(sse_data(r.iter_bytes()))
                outcome: Completion | BaseException = read_stream(events)
            except BaseException as e:  # noqa: BLE001 - kept, and the test fails on it
                outcome = e
            self.outcomes.append((job, outcome))
            self.done[worker] += 1
            k += 1

    def wait_each(self, more: int, than: list[int]) -> None:
        """Until every worker has finished `more` streams beyond the counts `than`."""
        wait_for(
            lambda: all(d >= t + more for d, t in zip(self.done, than, strict=True)),
            CLIENT_TIMEOUT_S,
            f"{more} more streams per traffic worker",
        )

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(CLIENT_TIMEOUT_S + 30)
            assert not t.is_alive(), "a traffic worker hangs"


@pytest.mark.slow
def test_scale_1_to_3_to_1_under_load(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Streams run without a break while the admin API adds two replicas and removes them again;
    a removed replica's streams that can't finish within the grace (here its core hangs, so
    that is certain, not raced) move to another replica. Every stream ends right."""
    emb = make_tiny_embedding_dir(tmp_path / "emb")
    args = [*BASE_ARGS, "--replicas", "1", "--admin-api-key", ADMIN_KEY]
    args += ["--replica-drain-grace", "0.5", "--model", f"emb={emb}"]
    args += ["--affinity-blocks", "0"]  # no prefix affinity: only a session's request is "affinity"
    once = tmp_path / "once"
    once.mkdir()
    server = ReplicaServer(tiny_model_dir, args, fault_env(once))
    try:
        route = server.url("/v1/models/{}/replicas")
        url = server.url("/v1/completions")
        chat = server.chat_model
        server.wait_replicas([0])

        def scale(name: str, body: dict, headers: dict[str, str] | None = None) -> httpx.Response:
            return httpx.post(
                route.format(name), json=body, headers=headers or {}, timeout=RESTART_WAIT_S
            )

        # the admin route's refusals
        assert scale(chat, {"replicas": 2}).status_code == 401
        wrong = {"Authorization": "Bearer sk-not-admin"}
        assert scale(chat, {"replicas": 2}, wrong).status_code == 401
        assert scale(chat, {"replicas": 0}, ADMIN).status_code == 400
        assert scale(chat, {"replicas": -1}, ADMIN).status_code == 400
        assert scale("emb", {"replicas": 2}, ADMIN).status_code == 400
        assert scale("no-such-model", {"replicas": 2}, ADMIN).status_code == 404
        assert sorted(server.replicas()) == [0]

        with ThreadPoolExecutor(1) as pool:  # one at a time: nothing else running
            streams = [LiveStream(pool, url, completion_body(p, n)) for p, n in TRAFFIC_JOBS]
            alone = [s.result() for s in streams]
        for got, (_, max_tokens) in zip(alone, TRAFFIC_JOBS, strict=True):
            assert_ran_to_length(got, max_tokens)

        traffic = Traffic(url, num_workers=3)
        try:
            traffic.wait_each(1, [0, 0, 0])
            mark = list(traffic.done)
            r = scale(chat, {"replicas": 3}, ADMIN)
            assert r.status_code == 200, r.text
            assert [x["replica"] for x in r.json()["replicas"]] == [0, 1, 2]
            assert [x["state"] for x in r.json()["replicas"]] == ["ready"] * 3
            traffic.wait_each(1, mark)  # traffic went on during the scale-up and after it
            server.wait_replicas([0, 1, 2], WAIT_S)
            for index in (1, 2):  # the new replicas serve
                wait_for(
                    lambda i=str(index): server.total(ROUTED, replica=i) > 0,
                    CLIENT_TIMEOUT_S,
                    f"a request routed to replica {index}",
                )

            # replica 2 (removed first) hangs with a stream on it: removal has to move it
            failovers0, log0 = server.total(FAILOVERS), len(server.full_log())
            hung_pid = server.replicas()[2]["pid"]
            session = server.session_on(2, "scale")
            routed0 = server.total(ROUTED, replica="2", reason="affinity")  # after the probes
            with ThreadPoolExecutor(2) as pool:
                stuck = LiveStream(pool, url, completion_body([*HANG, *range(30, 40)], 48), session)
                wait_for(
                    lambda: server.total(ROUTED, replica="2", reason="affinity") > routed0,
                    WAIT_S,
                    "the trigger routed to replica 2",
                    server.read_log,
                )
                mark = list(traffic.done)
                r = scale(chat, {"replicas": 1}, ADMIN)
                assert r.status_code == 200, r.text
                assert [x["replica"] for x in r.json()["replicas"]] == [0]
                got_stuck = stuck.result()
            traffic.wait_each(1, mark)
        finally:
            traffic.stop()

        assert_ran_to_length(got_stuck, 48)
        moved = [tuple(map(int, m)) for m in MOVED.findall(server.full_log()[log0:])]
        assert server.total(FAILOVERS) - failovers0 == len(moved), moved
        assert any(src == 2 for src, _, _ in moved), moved
        assert all(dst in (0, 1) for _, dst, _ in moved), moved
        wait_for(lambda: not pid_running(hung_pid), WAIT_S, "the removed hung core gone")
        after = server.wait_replicas([0], WAIT_S)
        assert after[0]["restarts"] == 0, after
        assert server.engine()["restarts"] == 0
        assert len(traffic.outcomes) >= 9
        for job, outcome in traffic.outcomes:
            assert isinstance(outcome, Completion), outcome
            assert_same(outcome, alone[job])
    finally:
        server.close()


# ---- 4. placement refused past the CPU count ------------------------------------------------


def test_more_pinned_replicas_than_cpus_exits_2(tiny_model_dir: Path) -> None:
    """`surge serve --replicas N` with pinning (the default) and fewer than N CPUs: exit code 2
    and a message saying why and what to do, before any model loads or port opens."""
    replicas = len(os.sched_getaffinity(0)) + 1
    cmd = [sys.executable, "-m", "surge.cli", "serve", str(tiny_model_dir), *TINY_ARGS]
    cmd += ["--replicas", str(replicas), "--host", "127.0.0.1", "--port", str(free_port())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert f"{replicas} replicas need at least {replicas} CPUs" in output, output
    assert "--no-replica-pinning" in output, output
