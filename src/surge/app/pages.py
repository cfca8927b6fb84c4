"""The browser UI: one page (`/`) and its static files (`/static/...`), shipped in the package.

The page is plain ES modules and vendored libraries (static/vendor/README.md); nothing is built
at install time. Every answer the model writes is rendered through DOMPurify, and the page's
Content-Security-Policy allows scripts from this origin only, so raw HTML from the model can't
run even if sanitizing missed something.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from starlette._utils import get_route_path
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

STATIC_DIR = Path(__file__).parent / "static"

# 'self' only: no inline script, no remote image (a model's markdown image can't call home)
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


def owns_path(path: str) -> bool:
    """The paths the app answers: its page, its static files, its API."""
    return path == "/" or path == "/api" or path.startswith(("/api/", "/static/"))


class _RevalidatedStaticFiles(StaticFiles):
    """Static files the browser revalidates on each load (an upgrade is seen at once; unchanged
    files cost a 304)."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def add_pages(app: FastAPI) -> None:
    """Serve the page at `/` and the files under `/static/`."""
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html, headers=PAGE_HEADERS)

    app.mount("/static", _RevalidatedStaticFiles(directory=STATIC_DIR), name="static")


class OwnedPathsRoute(BaseRoute):
    """Hands the app's own paths (`owns_path`) to it, unchanged, from a parent app; every other
    path stays the parent's, so its 404s and 405s (e.g. GET /v1/chat/completions) are still its
    own. How `mount_app` serves the app at "/"."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and owns_path(get_route_path(scope)):
            return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: object) -> object:
        raise NoMatchFound(name, path_params)  # type: ignore[arg-type]

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
