"""The app's own request-body limits, as ASGI middleware (the app sets them, not its host).

An upload route (`is_upload_path`) may take `max_upload_bytes`; every other route a small
`max_json_bytes`. A body is refused with 413 and the app's JSON error from its Content-Length
before anything is read, or as soon as the bytes read pass the limit; it is counted as it
streams in, never buffered here (an upload's parser spools its files to temporary files).

Upload routes check the session (and CSRF token) in their dependencies before they read the
body, so a client that is not logged in is answered 401 without the server reading its bytes.
JSON routes read the body before their dependencies run (FastAPI's order): the small cap is
what bounds an anonymous client there. `surge serve` leaves the app's paths to these limits
(its own `--max-body-size` keeps guarding /v1).
"""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse
from starlette._utils import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# POST /api/kbs/{id}/documents, POST /api/conversations/{id}/files
_UPLOAD_PATH = re.compile(r"^/api/(kbs/\d+/documents|conversations/\d+/files)$")


def is_upload_path(path: str) -> bool:
    """The routes that take multipart files (and max_upload_bytes)."""
    return _UPLOAD_PATH.match(path) is not None


def too_large_response(max_bytes: int, upload: bool) -> JSONResponse:
    """413 in the app's error shape; the connection closes (the rest of the body is unread)."""
    mib = max_bytes / (1024 * 1024)
    if upload:
        code, hint = "upload_too_large", "send fewer or smaller files"
        what = "the upload"
    else:
        code, hint, what = "body_too_large", "send a smaller request", "the request body"
    message = f"{what} is over the limit of {max_bytes} bytes ({mib:.1f} MiB); {hint}"
    return JSONResponse(
        {"error": {"message": message, "code": code}},
        status_code=413,
        headers={"Connection": "close"},
    )


# A body at most this far past its limit is read to the end (and dropped) before the 413 goes
# out: a server that closes a connection with request bytes still unread makes the kernel reset
# it, and the client may lose the 413 it hasn't read yet. Bigger bodies are not read: closed.
DRAIN_MAX_BYTES = 4 * 1024 * 1024


async def _drain(receive: Receive, budget: int) -> None:
    """Read and drop the rest of the request body, up to `budget` bytes."""
    drained = 0
    while drained <= budget:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class _BodyTooLarge(Exception):
    """Raised into the route from `receive` once the limit is passed."""


class AppBodyLimitMiddleware:
    """413 for a body over its route's limit (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int, max_json_bytes: int) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_json_bytes = max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = is_upload_path(get_route_path(scope))
        limit = self.max_upload_bytes if upload else self.max_json_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            if int(declared) <= limit + DRAIN_MAX_BYTES:
                await _drain(receive, DRAIN_MAX_BYTES + limit)
            await too_large_response(limit, upload)(scope, receive, send)
            return
        num_bytes = 0
        exceeded = started = False
        more_body = True  # the client has more of the body to send

        async def counted() -> Message:
            nonlocal num_bytes, exceeded, more_body
            message = await receive()
            if message["type"] == "http.request":
                more_body = bool(message.get("more_body", False))
                num_bytes += len(message.get("body", b""))
                if num_bytes > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the route's answer to its cut-off body (FastAPI makes it a 400): ours
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            if more_body:  # (past the last chunk, receive() would wait for the disconnect)
                await _drain(receive, DRAIN_MAX_BYTES)
            await too_large_response(limit, upload)(scope, receive, send)
