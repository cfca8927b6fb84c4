"""The app factory: routes, error handlers, middleware, lifespan (start the engine, drain, stop)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from surge.config import EngineConfig, ServerConfig
from surge.engine.async_engine import EngineDeadError, EngineOverloadedError
from surge.engine.request import InvalidRequestError
from surge.process import freeze_loaded_objects
from surge.router import ModelRegistry, Starter, estimate_cost
from surge.server.admin_api import router as admin_router
from surge.server.admission import Admission
from surge.server.app_health import engine_health
from surge.server.auth import KeyStore
from surge.server.encoders_api import router as encoders_router
from surge.server.metrics import Metrics
from surge.server.middleware import (
    BodyLimitMiddleware,
    HostGuardMiddleware,
    KeyCheckMiddleware,
    default_allowed_hosts,
    error_response,
)
from surge.server.models import ServedModels, StarterConfig, default_served_models, make_starter
from surge.server.openai import router
from surge.server.protocol import APIError
from surge.server.reaper import reap_forever
from surge.server.state import ServerState, StateDep

if TYPE_CHECKING:
    from surge.server.web_ui import UIConfig

logger = logging.getLogger(__name__)


def create_app(
    engine_config: EngineConfig,
    server_config: ServerConfig,
    models: ServedModels | None = None,
    ui: UIConfig | None = None,
    starter_factory: Callable[[StarterConfig], Starter] = make_starter,
) -> FastAPI:
    """A FastAPI app that loads its models in the lifespan (default: the bundled chat model);
    with `ui`, the web app at "/" (surge.server.web_ui). `starter_factory` says how a model
    starts (surge.serving.ray: as a front end over remote engine hosts)."""
    keys = KeyStore.from_config(server_config)  # a bad keys file fails here, before any loading
    models = models or default_served_models(engine_config)
    holder: dict[str, ServerState] = {}
    metrics = Metrics(lambda: holder["state"].engines(), lambda: holder["state"].encoders())
    admission = Admission(server_config, metrics)
    starter = starter_factory(
        StarterConfig(
            engine_config,
            server_config.supervisor,
            server_config.encoder_threads,
            server_config.replicas,
        )
    )
    registry = ModelRegistry(
        models.specs,
        starter,
        budget_bytes=models.memory_budget,
        estimator=functools.partial(estimate_cost, base=engine_config),
        abort_in_flight=lambda name, reason: _abort_model(holder["state"], name, reason),
    )
    state = ServerState(
        engine_config, server_config, keys, metrics, admission, registry, models.startup
    )
    holder["state"] = state
    docs = server_config.enable_docs
    app = FastAPI(
        title="surge",
        lifespan=_lifespan,
        docs_url="/docs" if docs else None,
        openapi_url="/openapi.json" if docs else None,
        redoc_url=None,
    )
    app.state.surge = state
    app.include_router(router)
    app.include_router(encoders_router)
    app.include_router(admin_router)
    app.add_api_route("/health", health, methods=["GET"], operation_id="health")
    app.add_api_route("/ready", ready, methods=["GET"], operation_id="ready")
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], operation_id="metrics")
    _add_error_handlers(app)
    if ui is not None:
        from surge.server.web_ui import add_web_app  # the app's store is imported only if used

        add_web_app(app, keys, server_config, ui)
    _add_middleware(app, state, with_ui=ui is not None)
    if keys.is_open:
        logger.info("no API key configured: the API is open")
    return app


def _add_middleware(app: FastAPI, state: ServerState, with_ui: bool) -> None:
    """Outermost last: Host guard, CORS, key + rate check, body limit (see middleware.py). The
    web app's paths have their own log-in and body limits: no key check or body limit there."""
    config = state.config
    skip = None
    if with_ui:
        from surge.app.pages import owns_path as skip
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes, skip=skip)
    app.add_middleware(
        KeyCheckMiddleware, keys=state.keys, check_limits=state.admission.check_key, skip=skip
    )
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    allowed = config.allowed_hosts
    if allowed is None:
        allowed = default_allowed_hosts(config.host, state.keys.is_open)
    elif with_ui:  # the web app calls this server by its internal address
        from surge.server.web_ui import internal_host

        allowed = (*allowed, internal_host(config.host))
    if allowed is not None:
        logger.info("accepting Host headers: %s", ", ".join(allowed))
        app.add_middleware(HostGuardMiddleware, allowed=allowed)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the start-up models in the background so /health answers while they load."""
    state: ServerState = app.state.surge
    tasks = [
        asyncio.create_task(_load_startup_models(state), name="surge-startup-load"),
        asyncio.create_task(reap_forever(state), name="surge-reaper"),
        asyncio.create_task(state.registry.run_expiry(1.0), name="surge-expiry"),
    ]
    try:
        yield
    finally:
        state.admission.draining = True
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await state.registry.close()


async def _load_startup_models(state: ServerState) -> None:
    """Load the start-up models together; a server that can't load one of them exits."""
    results = await asyncio.gather(
        *(state.registry.load(n) for n in state.startup_models), return_exceptions=True
    )
    for name, result in zip(state.startup_models, results, strict=True):
        if isinstance(result, BaseException):
            logger.error("model %s failed to load at start-up: %s", name, result)
            state.startup_error = f"{name}: {result}"
        else:
            state.metrics.model_loads.labels(model=name).inc()
    if state.startup_error is not None:
        os.kill(os.getpid(), signal.SIGTERM)  # a server without its models is of no use
        return
    freeze_loaded_objects(collect=True)
    logger.info("ready: %s", ", ".join(state.startup_models))


async def _abort_model(state: ServerState, name: str, reason: str) -> None:
    """An unload's grace ran out: end that model's requests with a visible error."""
    for ticket in list(state.admission.tickets.values()):
        if ticket.model == name and ticket.engine is not None:
            await ticket.engine.fail(ticket.req_id, f"model unloaded: {reason}")


async def health(state: StateDep) -> JSONResponse:
    """The process is alive: 200, with each engine's restarts and last failure if any; 503 once
    a start-up model's engine crashed too often to be restarted (restart the process)."""
    body: dict[str, object] = {"status": "ok"}
    engines = state.engines()
    body["engines"] = {name: engine_health(e) for name, e in engines.items()}
    failed = [n for n in state.startup_models if n in engines and engines[n].breaker_open]
    if failed:
        body["status"] = "failed"
        body["reason"] = "; ".join(
            f"{n}: the engine crashed too often and is not restarted: {engines[n].last_failure}"
            for n in failed
        )
        return JSONResponse(body, status_code=503)
    return JSONResponse(body)


async def ready(state: StateDep) -> JSONResponse:
    """200 when the start-up models are loaded and alive and the server accepts requests."""
    models = {n: s.state.value for n, s in state.registry.states().items()}
    if state.is_ready:
        return JSONResponse({"status": "ready", "models": models})
    body = {"status": "not ready", "reason": state.not_ready_reason, "models": models}
    return JSONResponse(body, status_code=503)


async def metrics_endpoint(state: StateDep) -> Response:
    """Prometheus text format."""
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _error(
    status: int, message: str, type: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return error_response(APIError(status, message, type, param, code))


# pydantic error types that only say "not this union member"; another error says more
_TYPE_MISMATCH = {
    "string_type",
    "int_type",
    "list_type",
    "dict_type",
    "model_type",
    "bool_type",
    "float_type",
    "int_from_float",
    "literal_error",
}


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    """400 naming the parameter of the most telling error (not a union's type mismatch)."""
    errors = list(exc.errors())
    err = next((e for e in errors if e.get("type") not in _TYPE_MISMATCH), None)
    err = err or (errors[0] if errors else {})
    if err.get("type") == "json_invalid":
        detail = err.get("ctx", {}).get("error", "")
        return _error(400, f"the body is not valid JSON: {detail}", "invalid_request_error")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # a union member's type name in loc (e.g. "list[TextPart]") is noise for the user
    param = ".".join(p for p in loc if not any(c in p for c in "[]()")) or None
    message = str(err.get("msg", "invalid value"))
    return _error(400, f"{param or 'body'}: {message}", "invalid_request_error", param)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's body; validation errors are 400 naming the parameter."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(InvalidRequestError)
    async def invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return _error(
            503, f"the engine is not running: {exc}", "service_unavailable", code="engine_dead"
        )

    @app.exception_handler(EngineOverloadedError)
    async def engine_overloaded(request: Request, exc: EngineOverloadedError) -> JSONResponse:
        return _error(503, str(exc), "service_unavailable", code="engine_overloaded")

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # never Starlette's plain-text 500: log it, answer OpenAI's body
        logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")


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
        if admission.tickets:
            logger.warning(
                "grace period of %gs over: aborting %d requests", grace, len(admission.tickets)
            )
            for ticket in list(admission.tickets.values()):
                if ticket.engine is not None:  # an error the client sees, not a quiet "abort"
                    await ticket.engine.fail(
                        ticket.req_id, f"server shutting down: {grace:g}s grace period over"
                    )
            # let the aborted streams write their last chunk and [DONE]
            end = time.monotonic() + 2.0
            while admission.tickets and time.monotonic() < end:
                await asyncio.sleep(0.05)
        self.should_exit = True


def run_server(
    engine_config: EngineConfig,
    server_config: ServerConfig,
    models: ServedModels | None = None,
    ui: UIConfig | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; 1 if a start-up model failed to load."""
    app = create_app(engine_config, server_config, models, ui)
    config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        access_log=False,  # one line per request comes from surge.server.requests instead
        timeout_graceful_shutdown=5,
        limit_concurrency=server_config.max_connections,
        timeout_keep_alive=server_config.timeout_keep_alive,
        log_config=None,  # keep the CLI's logging set-up
    )
    _DrainingServer(config, app.state.surge).run()
    return 1 if app.state.surge.startup_error else 0
