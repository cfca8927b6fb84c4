"""What the app holds while it runs (on `app.state.surge`), and typed dependencies to reach it."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, Request

from surge.config import EngineConfig, ServerConfig
from surge.encoders import EncoderClient
from surge.engine.async_engine import AsyncEngine
from surge.router import (
    KeepAlive,
    Lease,
    ModelKind,
    ModelLoadError,
    ModelNotFound,
    ModelRegistry,
    ModelState,
    parse_keep_alive,
)
from surge.server.admission import Admission
from surge.server.auth import KeyInfo, KeyStore, hash_key
from surge.server.metrics import Metrics
from surge.server.middleware import KEY_SCOPE
from surge.server.models import ChatHandle
from surge.server.protocol import APIError

_ROUTE_OF_KIND = {
    ModelKind.CHAT: "/v1/chat/completions or /v1/completions",
    ModelKind.EMBEDDING: "/v1/embeddings",
    ModelKind.RERANK: "/v1/rerank",
}


@dataclass(slots=True)
class ServerState:
    """The model registry, keys, admission and metrics of one app."""

    engine_config: EngineConfig  # the command line's engine options (models may override)
    config: ServerConfig
    keys: KeyStore
    metrics: Metrics
    admission: Admission
    registry: ModelRegistry
    startup_models: tuple[str, ...]  # loaded at start-up; /ready waits for them
    startup_error: str | None = None

    @property
    def draining(self) -> bool:
        return self.admission.draining

    # ---- readiness ----
    def engines(self) -> dict[str, AsyncEngine]:
        """The engines of every loaded chat model, by model name."""
        found = {}
        for name in self.registry.names():
            handle = self.registry.handle(name)
            if isinstance(handle, ChatHandle):
                found[name] = handle.engine
        return found

    def encoders(self) -> dict[str, EncoderClient]:
        """The workers of every loaded embedding/rerank model, by model name (each an
        EncoderClient, or under Ray Serve a RemoteEncoderClient with the same interface)."""
        found = {}
        for name in self.registry.names():
            handle = self.registry.handle(name)
            if handle is not None and not isinstance(handle, ChatHandle):
                found[name] = cast(EncoderClient, handle)
        return found

    def _model_ready(self, name: str) -> bool:
        handle = self.registry.handle(name)
        if isinstance(handle, ChatHandle):
            return handle.engine.is_ready
        return handle is not None and handle.is_alive()

    @property
    def is_ready(self) -> bool:
        """Every start-up model loaded and alive, and the server not draining."""
        return not self.draining and all(self._model_ready(n) for n in self.startup_models)

    @property
    def not_ready_reason(self) -> str:
        """Why /ready says 503."""
        if self.draining:
            return "draining"
        for name in self.startup_models:
            if self._model_ready(name):
                continue
            status = self.registry.status(name)
            handle = self.registry.handle(name)
            if isinstance(handle, ChatHandle) and handle.engine.breaker_open:
                return f"model {name}: engine failed and is not restarted: {handle.engine.last_failure}"
            if isinstance(handle, ChatHandle):
                return f"model {name}: engine restarting after: {handle.engine.last_failure}"
            detail = f": {status.reason}" if status.reason else ""
            return f"model {name} is {status.state.value}{detail}"
        return "ready"

    # ---- finding a model ----
    def resolve(self, model: str | None, kind: ModelKind, key: KeyInfo) -> str:
        """The model a request names (None = the first of this kind); 404, 403 or 400."""
        if model is None:
            name = next((n for n in self.registry.names() if self._kind(n) is kind), None)
            if name is None:
                raise APIError(404, f"this server serves no {kind.value} model", param="model")
        else:
            name = model
        try:
            actual = self._kind(name)
        except ModelNotFound as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        if key.models is not None and name not in key.models:
            raise APIError(
                403,
                f"this API key may not use the model {name!r}",
                type="permission_error",
                param="model",
                code="model_not_allowed",
            )
        if actual is not kind:
            raise APIError(
                400,
                f"{name!r} is a {actual.value} model; use {_ROUTE_OF_KIND[actual]}",
                param="model",
                code="wrong_model_kind",
            )
        return name

    def _kind(self, name: str) -> ModelKind:
        return self.registry.spec(name).kind

    def is_loaded(self, name: str) -> bool:
        return self.registry.status(name).state is ModelState.LOADED

    def fails_fast(self, name: str) -> bool:
        """FAILED and still in its restart backoff: acquire() refuses at once (a 503, not a
        stream that opens and then carries the error)."""
        status = self.registry.status(name)
        return status.state is ModelState.FAILED and (status.retry_at or 0) > time.monotonic()

    async def acquire(self, name: str, keep_alive: float | None | KeepAlive) -> Lease:
        """A lease on the loaded model, loading it on demand; 503 if it can't be loaded, or
        past --queue-timeout."""
        if self.draining:
            raise self.admission.reject(503, "draining", "the server is shutting down")
        try:
            return await asyncio.wait_for(
                self.registry.acquire(name, keep_alive), self.config.queue_timeout
            )
        except ModelLoadError as e:
            raise self.admission.reject(
                503, "model_unavailable", str(e), e.retry_after or None
            ) from None
        except asyncio.TimeoutError:
            raise APIError(
                504,
                f"model {name!r} did not load within the queue timeout",
                type="timeout_error",
                code="queue_timeout",
            ) from None

    def chat_engine(self, lease: Lease) -> AsyncEngine:
        """The lease's engine, or a 503 while its core restarts."""
        handle = lease.handle
        assert isinstance(handle, ChatHandle)
        engine = handle.engine
        if engine.breaker_open:
            raise self.admission.reject(
                503,
                "engine_failed",
                f"the engine failed and is not restarted: {engine.last_failure}",
            )
        if not engine.is_ready:
            raise self.admission.reject(
                503, "not_ready", "the engine is restarting; retry shortly", 1
            )
        return engine

    def encoder(self, lease: Lease) -> EncoderClient:
        handle = lease.handle
        assert not isinstance(handle, ChatHandle)
        return cast(EncoderClient, handle)  # or a RemoteEncoderClient: the same interface

    def is_admin(self, authorization: str | None) -> bool:
        """The admin key (`--admin-api-key`) as a Bearer token; False when none is configured."""
        expected = self.config.admin_key_hash
        if expected is None or not authorization or not authorization.lower().startswith("bearer "):
            return False
        return hmac.compare_digest(hash_key(authorization[7:].strip()), expected)


def request_keep_alive(value: str | int | float | None) -> float | None | KeepAlive:
    """A request's `keep_alive` extra (Ollama's format); 400 if it is malformed."""
    if value is None:
        return KeepAlive.UNSET
    try:
        return parse_keep_alive(value)
    except ValueError as e:
        raise APIError(400, str(e), param="keep_alive") from None


def get_state(request: Request) -> ServerState:
    return request.app.state.surge


StateDep = Annotated[ServerState, Depends(get_state)]


def get_key(request: Request, state: StateDep) -> KeyInfo:
    """The caller's key, as KeyCheckMiddleware found it before the body was read (401 if one is
    required and missing or wrong)."""
    key = request.scope.get(KEY_SCOPE)
    if isinstance(key, KeyInfo):
        return key
    return state.keys.authenticate(request.headers.get("authorization"))


KeyDep = Annotated[KeyInfo, Depends(get_key)]
