"""RemoteSurgeServer: the real `surge serve` in a subprocess on a free 127.0.0.1 port."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (from /proc; no psutil needed)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


class RemoteSurgeServer:
    """Starts `python -m surge.cli serve MODEL ARGS` and waits for /ready; `close()` kills it by PID."""

    def __init__(
        self, model: str | Path | None, args: list[str], ready_timeout: float = 240.0
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="surge-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "surge.cli", "serve"]
        cmd += [str(model)] if model is not None else []
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self._pids_seen: set[int] = set()
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.close()
            raise

    def url(self, path: str) -> str:
        return self.base_url + path

    def wait_ready(self, timeout: float) -> None:
        """Poll /ready until 200; fail with the server's log if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"surge serve exited with {self.proc.returncode}:\n{self.read_log()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url("/ready"), timeout=2).status_code == 200:
                    self._pids_seen.update(child_pids(self.proc.pid))
                    return
            time.sleep(0.2)
        raise TimeoutError(f"surge serve not ready after {timeout}s:\n{self.read_log()}")

    def core_pid(self) -> int:
        """The engine-core child process (named surge::engine-core)."""
        for pid in child_pids(self.proc.pid):
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"surge::engine-core" in cmdline or b"spawn_main" in cmdline:
                    self._pids_seen.add(pid)
                    return pid
        raise RuntimeError("no engine-core child process found")

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url("/v1"), api_key=api_key, max_retries=0, timeout=120)

    def async_client(self, api_key: str = "none") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.url("/v1"), api_key=api_key, max_retries=0, timeout=300
        )

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics by name and labels, the `model` and `replica` labels summed over."""
        text = httpx.get(self.url("/metrics"), timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                name = re.sub(r'(model|replica)="[^"]*",?', "", name)
                name = name.replace(",}", "}").replace("{}", "")
                values[name] = values.get(name, 0.0) + float(value)
        return values

    def read_log(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-8000:]

    def close(self) -> None:
        """Kill the server and its engine core by PID (children first: they'd be orphaned)."""
        pids = self._pids_seen | set(child_pids(self.proc.pid))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


@contextlib.contextmanager
def remote_server(model: str | Path | None, args: list[str]) -> Iterator[RemoteSurgeServer]:
    server = RemoteSurgeServer(model, args)
    try:
        yield server
    finally:
        server.close()


def sse_events(lines: Iterator[str]) -> Iterator[str]:
    """`data:` payloads and `:` comments of an SSE body, in order (comments as ':...')."""
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: ") :]
        elif line.startswith(":"):
            yield line


def parse_stream(events: list[str]) -> tuple[list[dict], list[str]]:
    """(JSON chunks, keep-alive comments) of a finished stream; asserts it ends with [DONE]."""
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1] if not e.startswith(":")]
    return chunks, [e for e in events if e.startswith(":")]
