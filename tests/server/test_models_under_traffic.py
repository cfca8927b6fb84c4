"""Model lifecycle while other models serve traffic (issue #9): load on demand, admin unload and
load, keep_alive 0, eviction under the memory budget, and an unload past its grace. During each
operation, threads keep sending requests to the models not under test (a pinned chat model and a
pinned embedding model); every one of them must end 200 with the answer it gives alone.

No wall clock decides a result: phases are counted (a traffic request done before the operation,
one started after it), states are polled until reached, and pytest-timeout is the only clock.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from surge.config import EngineConfig
from surge.router import ModelKind, ModelSpec, estimate_cost
from tests.encoders.tiny_encoders import make_tiny_embedding_dir
from tests.server.conftest import TINY_ARGS
from tests.server.utils import RemoteSurgeServer, parse_stream, remote_server, sse_events
from tests.tiny_models import make_tiny_model_dir

pytestmark = pytest.mark.timeout(600)

ADMIN = {"Authorization": "Bearer sk-admin-traffic"}
BASE, EMB = "base", "emb"  # pinned, loaded at start: they carry the traffic
A, B = "llama", "qwen"  # on demand (--models-dir): the lifecycle operations act on them
NUM_KV_BLOCKS = 64
MAX_TOKENS = 12
PROMPTS = ["Paris is the capital", "The quick brown fox", "def add(a, b):", "你好，世界"]
# between one worker's requests: steady traffic that leaves the 2 test CPUs room to load models
PACE_S = 0.05
TEXTS = ["The quick brown fox jumps.", "你好，世界！", "Paris is the capital of France.", "a b"]


def _budget(models: dict[str, Path]) -> int:
    """Room for the pinned chat and embedding models and one on-demand chat model, not two;
    the server estimates with the same function and the same engine options."""
    engine = EngineConfig(dtype="float32", num_kv_blocks=NUM_KV_BLOCKS)

    def cost(name: str, kind: ModelKind) -> int:
        return estimate_cost(ModelSpec(name, str(models[name]), kind), engine).total_bytes

    pinned = cost(BASE, ModelKind.CHAT) + cost(EMB, ModelKind.EMBEDDING)
    on_demand = sorted(cost(name, ModelKind.CHAT) for name in (A, B))
    return pinned + on_demand[1] + on_demand[0] // 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteSurgeServer]:
    root = tmp_path_factory.mktemp("under-traffic")
    models = {
        A: make_tiny_model_dir(root / "models" / A, "llama", seed=1),
        B: make_tiny_model_dir(root / "models" / B, "qwen2", seed=2),
        BASE: make_tiny_model_dir(root / BASE, "llama", seed=3),
        EMB: make_tiny_embedding_dir(root / EMB),
    }
    args = [*TINY_ARGS, "--num-kv-blocks", str(NUM_KV_BLOCKS), "--max-num-seqs", "1"]
    args += ["--model", f"{BASE}={models[BASE]}", "--model", f"{EMB}={models[EMB]}"]
    args += ["--models-dir", str(root / "models"), "--memory-budget", str(_budget(models))]
    args += ["--admin-api-key", ADMIN["Authorization"][7:], "--keepalive-interval", "0.05"]
    # a held stream must never be cut for being unread, however long an operation takes
    args += ["--unload-grace", "0.5", "--stream-read-timeout", "3600"]
    with remote_server(None, args) as s:
        yield s


@dataclass(frozen=True)
class Baseline:
    """What the traffic models answer with nothing else going on."""

    texts: dict[str, str]  # BASE's greedy completion of each prompt
    embeddings: dict[str, np.ndarray]  # EMB's embedding of each text, one text per request


@pytest.fixture(scope="module")
def baseline(server: RemoteSurgeServer) -> Baseline:
    with httpx.Client(timeout=120) as client:
        texts = {
            p: _complete(client, server, BASE, p).json()["choices"][0]["text"] for p in PROMPTS
        }
        embeddings = {t: _embed(client, server, [t])[0] for t in TEXTS}
    assert len(set(texts.values())) > 1  # the prompts tell apart what they got back
    return Baseline(texts, embeddings)


# ---- requests ----------------------------------------------------------------------------


def _complete(
    client: httpx.Client, server: RemoteSurgeServer, model: str, prompt: str, **extra: object
) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    return client.post(server.url("/v1/completions"), json=body | {"ignore_eos": True} | extra)


def _embed(client: httpx.Client, server: RemoteSurgeServer, texts: list[str]) -> np.ndarray:
    r = client.post(server.url("/v1/embeddings"), json={"model": EMB, "input": texts})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]])


def _completion_text(r: httpx.Response) -> str:
    """The text of a 200 completion that ran to max_tokens; AssertionError otherwise."""
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length", body
    assert body["usage"]["completion_tokens"] == MAX_TOKENS, body
    return choice["text"]


def _stream_text(events: list[str]) -> str:
    """The text of a finished stream that ran to max_tokens, its chunks in order."""
    chunks, _ = parse_stream(events)
    assert not [c for c in chunks if "error" in c], chunks
    choices = [c["choices"][0] for c in chunks if c.get("choices")]
    assert choices and choices[-1]["finish_reason"] == "length", chunks[-2:]
    return "".join(c["text"] for c in choices)


def states(server: RemoteSurgeServer) -> dict[str, str]:
    return {m["id"]: m["state"] for m in httpx.get(server.url("/v1/models")).json()["data"]}


def wait_for_state(server: RemoteSurgeServer, name: str, state: str) -> None:
    """Poll until `name` is in `state` (the pause only paces the polling; pytest-timeout bounds it)."""
    while states(server)[name] != state:
        time.sleep(0.05)


def admin(server: RemoteSurgeServer, name: str, action: str) -> httpx.Response:
    return httpx.post(server.url(f"/v1/models/{name}/{action}"), headers=ADMIN, timeout=300)


def given(server: RemoteSurgeServer, **wanted: str) -> None:
    """Bring on-demand models to "loaded"/"unloaded" by admin calls, unloads first (so a load
    never evicts): a test sets up its own starting point, whatever ran before it."""
    now = states(server)
    for name, want in sorted(wanted.items(), key=lambda kv: kv[1] == "loaded"):
        if now[name] != want:
            r = admin(server, name, "load" if want == "loaded" else "unload")
            assert r.status_code == 200 and r.json()["state"] == want, r.text
    assert {n: states(server)[n] for n in wanted} == wanted


# ---- traffic -----------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """One traffic request: which worker, the phase it started in, and what went wrong if anything."""

    worker: str
    phase: int
    error: str | None


@dataclass
class Traffic:
    """Threads that send requests to BASE and EMB until stopped, checking every answer against
    the baseline; `phase` counts the operations the test has marked as done."""

    server: RemoteSurgeServer
    baseline: Baseline
    phase: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        workers: dict[str, Callable[[httpx.Client, int], None]] = {
            "chat": self._chat,
            "emb-1": self._embeddings,
            "emb-2": self._embeddings,
        }
        for name, fn in workers.items():
            t = threading.Thread(target=self._run, args=(name, fn), name=f"traffic-{name}")
            self._threads.append(t)
            t.start()

    def _run(self, worker: str, request: Callable[[httpx.Client, int], None]) -> None:
        with httpx.Client(timeout=300) as client:
            i = 0
            while not self._stop.is_set():
                with self._cond:
                    phase = self.phase
                error = None
                try:
                    request(client, i)
                except Exception as e:  # noqa: BLE001 - every failure is reported, none lost
                    error = f"{type(e).__name__}: {e}"
                with self._cond:
                    self.outcomes.append(Outcome(worker, phase, error))
                    self._cond.notify_all()
                i += 1
                self._stop.wait(PACE_S)

    def _chat(self, client: httpx.Client, i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        text = _completion_text(_complete(client, self.server, BASE, prompt))
        assert text == self.baseline.texts[prompt], (prompt, text)

    def _embeddings(self, client: httpx.Client, i: int) -> None:
        texts = [TEXTS[i % len(TEXTS)], TEXTS[(i + 1) % len(TEXTS)]][: 1 + i % 2]
        got = _embed(client, self.server, texts)
        want = np.array([self.baseline.embeddings[t] for t in texts])
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5, texts

    def wait_each_done(self, since_phase: int) -> None:
        """Until every worker has finished a request started in `since_phase` or later (or any
        request failed: the checks report it)."""
        names = {t.name.removeprefix("traffic-") for t in self._threads}

        def reached() -> bool:
            if any(o.error for o in self.outcomes):
                return True
            return names <= {o.worker for o in self.outcomes if o.phase >= since_phase}

        with self._cond:
            self._cond.wait_for(reached)

    def next_phase(self) -> int:
        with self._cond:
            self.phase += 1
            return self.phase

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def check(self) -> None:
        """Every request answered 200, complete and equal to the baseline."""
        failed = [o for o in self.outcomes if o.error]
        assert not failed, failed[:5]
        assert {o.phase for o in self.outcomes} >= {0, 1}


@contextlib.contextmanager
def traffic_across(server: RemoteSurgeServer, baseline: Baseline) -> Iterator[Traffic]:
    """Traffic that spans the `with` body: each worker has had an answer before it runs, a
    stream to BASE opened before it is read to its end after it, and each worker has had an
    answer to a request sent after it. Checks everything on the way out."""
    traffic = Traffic(server, baseline)
    with contextlib.ExitStack() as stack:
        stack.callback(traffic.stop)
        traffic.start()
        traffic.wait_each_done(since_phase=0)
        client = stack.enter_context(httpx.Client(timeout=300))
        body = {"model": BASE, "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "stream": True}
        body |= {"temperature": 0, "ignore_eos": True}
        held = stack.enter_context(client.stream("POST", server.url("/v1/completions"), json=body))
        assert held.status_code == 200
        lines = held.iter_lines()
        events = [next(e for e in sse_events(lines) if not e.startswith(":"))]  # it has begun
        yield traffic
        traffic.wait_each_done(since_phase=traffic.next_phase())
        events += list(sse_events(lines))
    traffic.check()
    assert _stream_text(events) == baseline.texts[PROMPTS[1]]
    assert states(server)[BASE] == states(server)[EMB] == "loaded"


# ---- each operation, under traffic -------------------------------------------------------


def test_load_on_demand_while_others_serve(server: RemoteSurgeServer, baseline: Baseline) -> None:
    given(server, **{A: "unloaded", B: "unloaded"})
    body = {"model": A, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
    body |= {"ignore_eos": True}

    def streamed(client: httpx.Client) -> str:
        with client.stream(
            "POST", server.url("/v1/completions"), json=body | {"stream": True}
        ) as r:
            assert r.status_code == 200
            return _stream_text(list(sse_events(r.iter_lines())))

    with traffic_across(server, baseline), httpx.Client(timeout=300) as client:
        with ThreadPoolExecutor(2) as pool:  # two callers wait on the same load
            cold_stream = pool.submit(streamed, client)
            cold_json = pool.submit(client.post, server.url("/v1/completions"), json=body)
            texts = [cold_stream.result(), _completion_text(cold_json.result())]
    assert texts[0] == texts[1]
    assert states(server)[A] == "loaded"


def test_admin_unload_while_others_serve(server: RemoteSurgeServer, baseline: Baseline) -> None:
    given(server, **{B: "unloaded", A: "loaded"})
    with traffic_across(server, baseline):
        r = admin(server, A, "unload")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": A, "state": "unloaded", "aborted": 0}
    assert states(server)[A] == "unloaded"


def test_admin_load_while_others_serve(server: RemoteSurgeServer, baseline: Baseline) -> None:
    given(server, **{A: "unloaded", B: "unloaded"})
    with traffic_across(server, baseline):
        r = admin(server, A, "load")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "loaded"
    assert states(server)[A] == "loaded"
    with httpx.Client(timeout=120) as client:
        _completion_text(_complete(client, server, A, PROMPTS[2]))


def test_keep_alive_zero_unloads_after_the_request_while_others_serve(
    server: RemoteSurgeServer, baseline: Baseline
) -> None:
    given(server, **{B: "unloaded", A: "loaded"})
    with traffic_across(server, baseline), httpx.Client(timeout=300) as client:
        r = _complete(client, server, A, PROMPTS[3], keep_alive=0)
        _completion_text(r)  # the request itself ends complete
        wait_for_state(server, A, "unloaded")
    assert states(server)[A] == "unloaded"


def test_eviction_of_the_idle_model_while_others_serve(
    server: RemoteSurgeServer, baseline: Baseline
) -> None:
    given(server, **{B: "unloaded", A: "loaded"})
    with traffic_across(server, baseline), httpx.Client(timeout=300) as client:
        r = _complete(client, server, B, PROMPTS[0])  # B fits only once idle A is evicted
    _completion_text(r)
    s = states(server)
    assert s[B] == "loaded" and s[A] == "unloaded"


def test_a_load_waits_for_an_unload_in_progress_while_others_serve(
    server: RemoteSurgeServer, baseline: Baseline
) -> None:
    """B asked for while A's keep_alive 0 unload is still closing A: A's memory is on its way
    back, so B waits for it and loads (it used to be refused with a 503, "not enough memory")."""
    given(server, **{B: "unloaded", A: "loaded"})
    with traffic_across(server, baseline), httpx.Client(timeout=300) as client:
        _completion_text(_complete(client, server, A, PROMPTS[3], keep_alive=0))
        r = _complete(client, server, B, PROMPTS[0])  # A is unloading, or has just unloaded
    _completion_text(r)
    s = states(server)
    assert s[B] == "loaded" and s[A] == "unloaded"


def test_unload_past_its_grace_errors_the_stream_while_others_serve(
    server: RemoteSurgeServer, baseline: Baseline
) -> None:
    given(server, **{A: "unloaded", B: "loaded"})
    # n=8 choices of 480 tokens, one at a time (--max-num-seqs 1): far longer than the grace
    body = {"model": B, "prompt": "x", "max_tokens": 480, "n": 8, "stream": True}
    body |= {"ignore_eos": True}
    with traffic_across(server, baseline), httpx.Client(timeout=300) as client:
        with client.stream("POST", server.url("/v1/completions"), json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(e for e in sse_events(lines) if not e.startswith(":"))  # B is generating
            unload = admin(server, B, "unload")
            rest = list(sse_events(lines))
    assert unload.status_code == 200, unload.text
    assert unload.json() == {"id": B, "state": "unloaded", "aborted": 1}
    errors = [json.loads(e)["error"] for e in rest if e.startswith("{") and '"error"' in e]
    assert rest[-1] == "[DONE]" and len(errors) == 1, rest[-3:]
    assert "unloaded" in errors[0]["message"] and errors[0]["code"] == "engine_error"
    assert states(server)[B] == "unloaded"
