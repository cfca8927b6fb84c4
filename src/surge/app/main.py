"""`create_app(config)`: the app as one ASGI application, its state built in the lifespan."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from surge.app import accounts, admin, chat, conversations, kb_chat, kb_documents, kb_routes, pages
from surge.app.config import AppConfig
from surge.app.db import create_schema, make_engine, make_sessions
from surge.app.deps import AppState
from surge.app.errors import AppError, app_error_handler
from surge.app.kb_service import KnowledgeService
from surge.app.limits import AppBodyLimitMiddleware
from surge.app.security import RateLimiter
from surge.app.upstream import Upstream, make_client


def create_app(config: AppConfig, *, clock: Callable[[], float] = time.monotonic) -> FastAPI:
    """The app: accounts, conversations, chat and knowledge bases under /api (documented at
    /api/docs and in docs/app-api.md), the browser UI at / and /static/. `clock` drives the
    rate limiter (tests pass a fake one instead of sleeping)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.database_url is None:
            config.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(config.store_url)
        await create_schema(engine)
        client = make_client(config)
        state = AppState(
            config=config,
            engine=engine,
            sessions=make_sessions(engine),
            upstream=Upstream(client, config.api_base),
            limiter=RateLimiter(config.max_requests_per_minute, clock),
        )
        state.kb = await KnowledgeService.start(config, state.sessions, state.upstream)
        app.state.surge_app = state
        try:
            yield
        finally:
            await state.kb.close()  # ingestion jobs stop; their documents resume next start
            await client.aclose()
            await engine.dispose()

    app = FastAPI(
        title="surge app",
        lifespan=lifespan,
        docs_url="/api/docs",
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    app.add_exception_handler(AppError, app_error_handler)
    app.add_middleware(
        AppBodyLimitMiddleware,
        max_upload_bytes=config.max_upload_bytes,
        max_json_bytes=config.max_json_bytes,
    )
    for module in (accounts, admin, conversations, chat, kb_routes, kb_documents, kb_chat):
        app.include_router(module.router)

    @app.get("/api/health", operation_id="health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    pages.add_pages(app)
    return app


def mount_app(parent: FastAPI, app: FastAPI, path: str = "/") -> None:
    """Serve `app` inside `parent` (how `surge serve` hosts it): Starlette runs no lifespan of a
    mounted app, so `parent`'s lifespan is wrapped to run the app's too. At "/" the app takes
    only its own paths (/, /api/..., /static/...: pages.owns_path) and the parent keeps every
    other, its 404s and 405s included."""
    parent_lifespan = parent.router.lifespan_context

    @asynccontextmanager
    async def lifespan(outer: FastAPI) -> AsyncIterator[object]:
        async with app.router.lifespan_context(app), parent_lifespan(outer) as state:
            yield state

    parent.router.lifespan_context = lifespan
    if path.rstrip("/"):
        parent.mount(path.rstrip("/"), app)
    else:
        parent.router.routes.append(pages.OwnedPathsRoute(app))
