"""The app factory: routes, error handlers, body limit, lifespan (start the engine, drain, stop)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from surge.config import EngineConfig, ServerConfig
from surge.engine.async_engine import AsyncEngine, EngineDeadError
from surge.engine.request import InvalidRequestError
from surge.server.admission import Admission
from surge.server.auth import KeyStore
from surge.server.metrics import Metrics
from surge.server.openai import router
from surge.server.protocol import APIError
from surge.server.state import ServerState, StateDep

logger = logging.getLogger(__name__)


def create_app(engine_config: EngineConfig, server_config: ServerConfig) -> FastAPI:
    """A FastAPI app that starts its own AsyncEngine in the lifespan."""
    keys = KeyStore.from_config(server_config)  # a bad keys file fails here, before any loading
    holder: dict[str, ServerState] = {}
    metrics = Metrics(lambda: holder["state"].engine.stats if holder["state"].engine else None)
    admission = Admission(server_config, engine_config.max_num_seqs, metrics)
    state = ServerState(engine_config, server_config, keys, metrics, admission)
    holder["state"] = state
    app = FastAPI(title="surge", lifespan=_lifespan)
    app.state.surge = state
    app.include_router(router)
    app.add_api_route("/health", health, methods=["GET"], operation_id="health")
    app.add_api_route("/ready", ready, methods=["GET"], operation_id="ready")
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], operation_id="metrics")
    _add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=server_config.max_body_bytes)
    if keys.is_open:
        logger.info("no API key configured: the API is open")
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the engine in the background so /health answers while the model loads."""
    state: ServerState = app.state.surge
    task = asyncio.create_task(_start_engine(state), name="surge-engine-start")
    try:
        yield
    finally:
        state.admission.draining = True
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if state.engine is not None:
            await state.engine.shutdown()


async def _start_engine(state: ServerState) -> None:
    try:
        state.engine = await AsyncEngine.create(state.engine_config, multiprocess=True)
    except Exception as e:  # noqa: BLE001 - a server without a model is of no use: exit
        logger.exception("the engine failed to start")
        state.startup_error = str(e)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    logger.info(
        "engine ready: model %s, max_model_len %d, KV cache %d tokens",
        state.model_name,
        state.engine.limits.max_model_len,
        state.engine.limits.kv_capacity_tokens,
    )


async def health() -> dict[str, str]:
    """The process is alive (says nothing about the engine)."""
    return {"status": "ok"}


async def ready(state: StateDep) -> JSONResponse:
    """200 when the engine is loaded and alive and the server accepts requests, else 503."""
    if state.is_ready:
        return JSONResponse({"status": "ready"})
    reason = "draining" if state.draining else "engine not ready"
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)


async def metrics_endpoint(state: StateDep) -> Response:
    """Prometheus text format."""
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _error(
    status: int, message: str, type: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(APIError(status, message, type, param, code).body(), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's body; validation errors are 400 naming the parameter."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(InvalidRequestError)
    async def invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return _error(
            503, f"the engine is not running: {exc}", "service_unavailable", code="engine_dead"
        )

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        if err.get("type") == "json_invalid":
            return _error(
                400,
                f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}",
                "invalid_request_error",
            )
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        # a union member's type name in loc (e.g. "list[TextPart]") is noise for the user
        param = ".".join(p for p in loc if not any(c in p for c in "[]()")) or None
        return _error(
            400,
            f"{param or 'body'}: {err.get('msg', 'invalid value')}",
            "invalid_request_error",
            param,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)


class BodyLimitMiddleware:
    """413 for a request body over `max_bytes` (by Content-Length, or counted as it streams in)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
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
        response = _error(
            413, f"the request body is larger than {self.max_bytes} bytes", "invalid_request_error"
        )
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


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains first: new requests get 503 while in-flight
    ones finish (up to the grace period; then they are aborted), and only then does it exit."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._draining_task is not None or self._state.draining:
            super().handle_exit(sig, frame)  # a second signal (or nothing started): exit now
            return
        logger.info("signal %d: draining (503 for new requests)", sig)
        self._state.admission.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._draining_task = asyncio.create_task(self._drain(), name="surge-drain")

    async def _drain(self) -> None:
        admission, grace = self._state.admission, self._state.config.shutdown_grace
        deadline = time.monotonic() + grace
        while admission.tickets and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if admission.tickets and self._state.engine is not None:
            logger.warning(
                "grace period of %gs over: aborting %d requests", grace, len(admission.tickets)
            )
            for req_id in list(admission.tickets):
                await self._state.engine.abort(req_id)
            # let the aborted streams write their last chunk and [DONE]
            end = time.monotonic() + 2.0
            while admission.tickets and time.monotonic() < end:
                await asyncio.sleep(0.05)
        self.should_exit = True


def run_server(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT; 1 if the engine failed to start."""
    app = create_app(engine_config, server_config)
    config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        access_log=False,  # one line per request comes from surge.server.requests instead
        timeout_graceful_shutdown=5,
        log_config=None,  # keep the CLI's logging set-up
    )
    _DrainingServer(config, app.state.surge).run()
    return 1 if app.state.surge.startup_error else 0
