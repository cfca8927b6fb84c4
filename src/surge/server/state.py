"""What the app holds while it runs (on `app.state.surge`), and typed dependencies to reach it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from surge.config import EngineConfig, ServerConfig
from surge.engine.async_engine import AsyncEngine
from surge.server.admission import Admission
from surge.server.auth import KeyInfo, KeyStore
from surge.server.metrics import Metrics
from surge.server.middleware import KEY_SCOPE
from surge.server.protocol import APIError


@dataclass(slots=True)
class ServerState:
    """The engine (None while it loads), keys, admission and metrics of one app."""

    engine_config: EngineConfig
    config: ServerConfig
    keys: KeyStore
    metrics: Metrics
    admission: Admission
    engine: AsyncEngine | None = None
    startup_error: str | None = None
    extra_model_names: set[str] = field(default_factory=set)

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @property
    def is_ready(self) -> bool:
        """Engine loaded and alive, and the server not draining."""
        return self.engine is not None and self.engine.is_ready and not self.draining

    @property
    def not_ready_reason(self) -> str:
        """Why /ready says 503."""
        if self.draining:
            return "draining"
        if self.engine is not None and self.engine.breaker_open:
            return f"engine failed and is not restarted: {self.engine.last_failure}"
        if self.engine is not None:
            return f"engine restarting after: {self.engine.last_failure}"
        return "engine loading"

    @property
    def model_name(self) -> str:
        """The name clients use (`--served-model-name`, else the engine's)."""
        if self.config.served_model_name:
            return self.config.served_model_name
        return self.engine.model_name if self.engine is not None else "surge"

    def ready_engine(self) -> AsyncEngine:
        """The engine, or a 503 while it loads, restarts or the server drains."""
        if self.draining:
            raise self.admission.reject(503, "draining", "the server is shutting down")
        if self.engine is not None and self.engine.breaker_open:
            raise self.admission.reject(503, "engine_failed", self.not_ready_reason)
        if self.engine is None or not self.engine.is_ready:
            raise self.admission.reject(
                503,
                "not_ready",
                "the engine is not ready (loading or restarting); retry shortly",
                1,
            )
        return self.engine

    def check_model(self, model: str | None) -> None:
        """404 for a model this server does not serve (None = the served model)."""
        names = {self.model_name} | self.extra_model_names
        if self.engine is not None:
            names.add(self.engine.model_name)
        if model is not None and model not in names:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )


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
