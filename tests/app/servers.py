"""Real HTTP for the app's tests: an ASGI app under uvicorn on 127.0.0.1, in a thread, and a
small client that plays one browser (its cookie jar, its CSRF token)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import uvicorn
from starlette.types import ASGIApp


class ServerThread:
    """uvicorn serving `app` on a free port until `stop()`."""

    def __init__(self, app: ASGIApp) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        # a stream still open at stop() is cancelled after 2 s, then the lifespan shuts down
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), "server start")
        if not self.server.started:
            raise RuntimeError("the server failed to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Poll until `predicate()` is true; the timeout only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Browser:
    """One user's browser: cookies kept by the client, the CSRF token sent on changes."""

    def __init__(self, base_url: str) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=30.0)
        self.csrf: str | None = None

    def close(self) -> None:
        self.client.close()

    def _enter(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code in (200, 201):
            self.csrf = resp.json()["csrf_token"]
        return resp

    def signup(self, username: str, password: str = "password123") -> httpx.Response:
        return self._enter(
            self.client.post("/api/signup", json={"username": username, "password": password})
        )

    def login(self, username: str, password: str = "password123") -> httpx.Response:
        return self._enter(
            self.client.post("/api/login", json={"username": username, "password": password})
        )

    def headers(self) -> dict[str, str]:
        return {"X-CSRF-Token": self.csrf} if self.csrf else {}

    def get(self, path: str, **kw: object) -> httpx.Response:
        return self.client.get(path, **kw)  # type: ignore[arg-type]

    def send(self, method: str, path: str, body: object = None) -> httpx.Response:
        return self.client.request(method, path, json=body, headers=self.headers())

    def new_conversation(self, **fields: object) -> int:
        resp = self.send("POST", "/api/conversations", fields)
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    def stream(self, method: str, path: str, body: object = None) -> list[dict[str, object]]:
        """An SSE answer read to its end: the events, in order."""
        with self.client.stream(method, path, json=body, headers=self.headers()) as resp:
            assert resp.status_code == 200, resp.read()
            assert resp.headers["content-type"].startswith("text/event-stream")
            return list(events(resp))


def events(resp: httpx.Response) -> Iterator[dict[str, object]]:
    """The `data:` events of an SSE response as they arrive."""
    for line in resp.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[6:])
