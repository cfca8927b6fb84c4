"""Helpers of the fault tests: servers with injected faults or their own process group, /proc
reads, polling, SSE read the way SSE says, and clients that stop reading."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx

from tests.reliability.utils import error_shape_problem
from tests.server.utils import RemoteSurgeServer, free_port

_T = TypeVar("_T")

# Long enough for any condition below on a loaded 2-core CI machine; nothing is timed against it.
WAIT_S = 60.0
# A core restart loads torch and the model in a fresh process: slow on a busy machine.
RESTART_WAIT_S = 180.0
# A client never waits this long for an answer that must come: a hang fails the test, not CI.
CLIENT_TIMEOUT_S = 120.0


class FaultServer(RemoteSurgeServer):
    """RemoteSurgeServer with extra environment (e.g. SURGE_TEST_FAULTS) and optionally its own
    session and process group (so the test can signal the whole group)."""

    def __init__(
        self,
        model: str | Path,
        args: list[str],
        env: dict[str, str] | None = None,
        new_session: bool = False,
        ready_timeout: float = 240.0,
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="surge-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "surge.cli", "serve", str(model)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=new_session,
        )
        self._pids_seen: set[int] = set()
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.close()
            raise

    def health(self) -> tuple[int, dict]:
        """/health's status and body."""
        r = httpx.get(self.url("/health"), timeout=10)
        return r.status_code, r.json()

    def engine_health(self) -> tuple[int, dict]:
        """/health's status and the one engine's view: {"status", "reason", "restarts",
        "last_failure"} (from a body with an `engines` map by model, or the flat one)."""
        status, body = self.health()
        view = {"status": body.get("status"), "reason": body.get("reason")}
        if "engines" in body:
            engines = list(body["engines"].values())
            assert len(engines) <= 1, body
            engine = engines[0] if engines else {}
            view.update(restarts=engine.get("restarts"), last_failure=engine.get("last_failure"))
        else:
            view.update(
                restarts=body.get("engine_restarts"), last_failure=body.get("last_engine_failure")
            )
        return status, view

    def ready(self) -> tuple[int, dict]:
        """/ready's status and body."""
        r = httpx.get(self.url("/ready"), timeout=10)
        return r.status_code, r.json()

    def restarted(self, old_core_pid: int, timeout: float = RESTART_WAIT_S) -> int:
        """Wait for a ready server with a new core; its PID."""

        def new_core() -> int | None:
            if self.ready()[0] != 200:
                return None
            with contextlib.suppress(RuntimeError):
                pid = self.core_pid()
                return pid if pid != old_core_pid else None
            return None

        return wait_for(new_core, timeout, "a restarted engine core", self.read_log)


@contextlib.contextmanager
def fault_server(
    model: str | Path, args: list[str], env: dict[str, str] | None = None
) -> Iterator[FaultServer]:
    """A FaultServer for a `with` block, stopped by PID at its end."""
    server = FaultServer(model, args, env)
    try:
        yield server
    finally:
        server.close()


def wait_for(
    condition: Callable[[], _T | None],
    timeout: float,
    what: str,
    explain: Callable[[], str] | None = None,
    interval: float = 0.02,
) -> _T:
    """Poll `condition` until it returns something truthy; fail after `timeout` saying `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = explain() if explain is not None else ""
            raise AssertionError(f"no {what} after {timeout:g}s\n{detail}")
        time.sleep(interval)


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def pid_running(pid: int) -> bool:
    """The process exists and is not a zombie (a container's PID 1 may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def sse_post(
    url: str,
    body: dict,
    on_event: Callable[[str], None] | None = None,
    opened: threading.Event | None = None,
) -> list[str]:
    """POST a streaming request; its `data:` payloads in order (keep-alive comments left out),
    or ["HTTP <status> <body>"] when it is refused. Sets `opened` once the stream has begun."""
    events: list[str] = []
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                r.read()
                return [f"HTTP {r.status_code} {r.text}"]
            if opened is not None:
                opened.set()
            for event in sse_data(r.iter_bytes()):
                events.append(event)
                if on_event is not None:
                    on_event(event)
    return events


def sse_data(chunks: Iterator[bytes]) -> Iterator[str]:
    """The `data:` payloads of an SSE body, split into lines as SSE says: on LF (and CRLF) only.
    Not httpx's iter_lines: like str.splitlines it also breaks at U+0085, U+2028 and U+2029,
    which generated text (JSON with ensure_ascii=False) can hold raw."""
    buffer = b""
    for chunk in chunks:
        *lines, buffer = (buffer + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"data: "):
                yield line[len(b"data: ") :].rstrip(b"\r").decode()


def stream_text(events: list[str]) -> tuple[str, str | None]:
    """(text, finish_reason) of a finished single-choice stream that ended normally."""
    assert events and events[-1] == "[DONE]", events[-3:]
    text, finish = "", None
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            delta = choice.get("delta")
            text += (delta.get("content") or "") if delta is not None else choice["text"]
            finish = choice.get("finish_reason") or finish
    return text, finish


def stream_error(events: list[str]) -> dict:
    """The error of a stream that must end with an error event then [DONE]."""
    assert len(events) >= 2 and events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert "error" in last, events[-3:]
    assert not any("error" in json.loads(e) for e in events[:-2]), events
    return last["error"]


def has_token(event: str) -> bool:
    """An SSE chunk that carries generated text or a choice's finish_reason."""
    if event == "[DONE]":
        return False
    for choice in json.loads(event).get("choices", []):
        delta = choice.get("delta")
        if (delta.get("content") if delta is not None else choice.get("text")) or choice.get(
            "finish_reason"
        ):
            return True
    return False


class StalledReader:
    """A raw-socket client that sends one streaming request and then never reads: with a small
    receive buffer the server soon blocks on sending to it."""

    def __init__(
        self, port: int, path: str, body: dict, rcvbuf: int = 4096, mss: int = 1000
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connect: the window scale and the MSS are agreed in the handshake. A small MSS
        # keeps the server's send buffer small too: Linux sizes it from the congestion window
        # in segments, and loopback's 64 KiB MSS would let it hold megabytes for a reader that
        # never reads.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        self.sock.connect(("127.0.0.1", port))
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + payload)

    def close(self) -> None:
        self.sock.close()


class WatchedStream:
    """A streaming request run on a pool thread, watched as it goes: whether a token has come,
    and how many of its choices have finished (with n > 1 and one sequence at a time in the
    engine, its choices run one after another: a long, countable window)."""

    def __init__(self, pool: ThreadPoolExecutor, url: str, body: dict) -> None:
        self.opened = threading.Event()  # admitted: the response has begun
        self.first_token = threading.Event()
        self.num_finished = 0
        self.future: Future[list[str]] = pool.submit(
            sse_post, url, body, self._on_event, self.opened
        )

    def _on_event(self, event: str) -> None:
        if not has_token(event):
            return
        self.first_token.set()
        choices = json.loads(event)["choices"]
        self.num_finished += sum(1 for c in choices if c.get("finish_reason"))

    def wait_first_token(self) -> None:
        assert self.first_token.wait(WAIT_S), "no token"

    def wait_opened(self) -> None:
        assert self.opened.wait(WAIT_S), "the stream did not begin"

    def events(self) -> list[str]:
        return self.future.result(timeout=CLIENT_TIMEOUT_S + 30)


def assert_engine_error(response: httpx.Response, *words: str) -> str:
    """A non-streaming request the engine failed: HTTP 500, OpenAI's body, code engine_error."""
    assert response.status_code == 500, (response.status_code, response.text)
    assert error_shape_problem(response.content) is None, response.text
    error = response.json()["error"]
    assert error["code"] == "engine_error", error
    for word in words:
        assert word in error["message"], error
    return error["message"]


def assert_stream_engine_error(events: list[str], *words: str) -> str:
    """A stream the engine failed: an error event (OpenAI's shape) and then [DONE]."""
    error = stream_error(events)
    assert error_shape_problem(json.dumps({"error": error}).encode()) is None, error
    assert error["code"] == "engine_error", error
    for word in words:
        assert word in error["message"], error
    return error["message"]


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def drained_outcome(outcome: list[str] | httpx.Response) -> str:
    """How a request cut by the drain ended: finished (stop/length), error (explicit, in OpenAI's
    shape), or else what is wrong with it."""
    if isinstance(outcome, httpx.Response):
        if outcome.status_code >= 500 and error_shape_problem(outcome.content) is None:
            return "error"
        if outcome.status_code != 200:
            return f"HTTP {outcome.status_code} {outcome.text[:200]}"
        finish = outcome.json()["choices"][0]["finish_reason"]
        return "finished" if finish in ("stop", "length") else f"200 with finish_reason {finish!r}"
    if not outcome or outcome[-1] != "[DONE]":
        return f"no [DONE] at the end: {outcome[-2:]}"
    last = json.loads(outcome[-2])
    if "error" in last:
        return "error" if error_shape_problem(outcome[-2].encode()) is None else str(last)
    finish = [c.get("finish_reason") for e in outcome[:-1] for c in json.loads(e)["choices"]]
    finish = [f for f in finish if f]
    if finish in (["stop"], ["length"]):
        return "finished"
    return f"[DONE] after finish_reason {finish} and no error event"
