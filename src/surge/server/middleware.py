"""ASGI middleware that runs before a body is read: Host guard, API key and rate check, body limit.

Order, outermost first: HostGuard -> (CORS) -> KeyCheck -> BodyLimit -> the routes. So an
unauthenticated or rate-limited client is refused before the server reads or parses its body.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from surge.server.auth import KeyInfo, KeyStore
from surge.server.protocol import APIError

# Routes anyone may call: liveness probes and the scrape endpoint (no prompts, no tokens).
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
KEY_SCOPE = "surge.key"  # where KeyCheck leaves the caller's KeyInfo in the ASGI scope


def is_admin_path(path: str) -> bool:
    """/v1/models/{name}/load, /unload and /replicas: the admin key's, not a user key's."""
    return path.startswith("/v1/models/") and path.endswith(("/load", "/unload", "/replicas"))


def error_response(error: APIError) -> JSONResponse:
    """OpenAI's error body with the error's status and headers."""
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def is_loopback(host: str) -> bool:
    """A loopback bind address (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str, api_is_open: bool) -> tuple[str, ...] | None:
    """Loopback names only for an open API bound to loopback (DNS rebinding); else any."""
    return LOOPBACK_NAMES if api_is_open and is_loopback(bind_host) else None


class HostGuardMiddleware:
    """400 for a Host header not in the allow-list (names, '*.domain' or '*')."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.any = "*" in allowed
        self.names = {h.lower() for h in allowed if not h.startswith("*")}
        self.suffixes = tuple(h[1:].lower() for h in allowed if h.startswith("*."))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any or self._allowed(_host_name(scope)):
            await self.app(scope, receive, send)
            return
        error = APIError(400, "this Host header is not allowed here", code="invalid_host")
        await error_response(error)(scope, receive, send)

    def _allowed(self, host: str) -> bool:
        return host in self.names or (bool(self.suffixes) and host.endswith(self.suffixes))


def _host_name(scope: Scope) -> str:
    """The Host header without its port ('[::1]:8000' -> '[::1]')."""
    raw = dict(scope["headers"]).get(b"host", b"").decode("latin-1").strip().lower()
    if raw.startswith("["):
        return raw[: raw.find("]") + 1]
    return raw.rsplit(":", 1)[0] if raw.count(":") == 1 else raw


class KeyCheckMiddleware:
    """Authenticate (401) and check the key's rate limits (429) before any body is read."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyStore,
        check_limits: Callable[[KeyInfo], None],
        skip: Callable[[str], bool] | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.check_limits = check_limits
        self.skip = skip  # paths with their own log-in (the web app's)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or is_admin_path(path):
            await self.app(scope, receive, send)  # admin routes check the admin key themselves
            return
        if self.skip is not None and self.skip(path):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization")
        try:
            key = self.keys.authenticate(None if auth is None else auth.decode("latin-1"))
            if scope["method"] == "POST":
                self.check_limits(key)
        except APIError as e:
            await error_response(e)(scope, receive, send)
            return
        scope[KEY_SCOPE] = key
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a request body over `max_bytes` (by Content-Length, or counted as it streams in).
    Paths `skip` names (the web app's) are left to their own limits (`surge.app.limits`)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, skip: Callable[[str], bool] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.skip is not None and self.skip(scope["path"])):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        # read the body up front (the routes read it whole anyway) so a chunked upload is counted
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"the request body is larger than {self.max_bytes} bytes")
        response = error_response(error)
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then the server's (for disconnects)."""
    sent = False

    async def wrapped() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped
