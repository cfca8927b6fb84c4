"""Admin routes (the --admin-api-key's, never a user key's): load and unload models, and set a
chat model's replica count, at run time."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from surge.engine.placement import PlacementError
from surge.router import InsufficientMemoryError, ModelLoadError, ModelNotFound
from surge.server.app_health import engine_health
from surge.server.models import ChatHandle
from surge.server.protocol import APIError
from surge.server.state import ServerState, StateDep

router = APIRouter()
JSON = dict[str, object]


def _admin(request: Request, state: ServerState) -> None:
    if state.config.admin_key_hash is None:
        raise APIError(
            403,
            "the admin API is off; start the server with --admin-api-key",
            type="permission_error",
            code="admin_disabled",
        )
    if not state.is_admin(request.headers.get("authorization")):
        raise APIError(
            401,
            "this route needs the admin key",
            type="authentication_error",
            code="invalid_admin_key",
        )


@router.post("/v1/models/{name}/load", operation_id="load_model")
async def load_model(name: str, request: Request, state: StateDep) -> JSON:
    """Load a registered model now (admin key); ends ready, or with the failure's reason."""
    _admin(request, state)
    try:
        await state.registry.load(name)
    except ModelNotFound as e:
        raise APIError(404, str(e), param="name", code="model_not_found") from None
    except ModelLoadError as e:
        raise APIError(503, str(e), type="service_unavailable", code="model_unavailable") from None
    state.metrics.model_loads.labels(model=name).inc()
    status = state.registry.status(name)
    events = [e.message for e in state.registry.events(name)]
    return {"id": name, "state": status.state.value, "events": events}


@router.post("/v1/models/{name}/unload", operation_id="unload_model")
async def unload_model(name: str, request: Request, state: StateDep) -> JSON:
    """Unload a model (admin key): in-flight requests get --unload-grace seconds, then end with
    an error."""
    _admin(request, state)
    try:
        aborted = await state.registry.unload(name, state.config.unload_grace)
    except ModelNotFound as e:
        raise APIError(404, str(e), param="name", code="model_not_found") from None
    return {"id": name, "state": state.registry.status(name).state.value, "aborted": aborted}


class ScaleRequest(BaseModel):
    """The replica count a chat model should have, and how long removed replicas may drain."""

    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(ge=1, le=1024)
    grace: float | None = Field(default=None, ge=0, le=86_400)  # None = --replica-drain-grace


@router.post("/v1/models/{name}/replicas", operation_id="scale_model")
async def scale_model(name: str, body: ScaleRequest, request: Request, state: StateDep) -> JSON:
    """Add or remove replicas of a loaded chat model (admin key). A removed replica drains: no
    new requests; its requests get `grace` seconds to finish, then continue on another replica."""
    _admin(request, state)
    try:
        handle = state.registry.handle(name)
    except ModelNotFound as e:
        raise APIError(404, str(e), param="name", code="model_not_found") from None
    if not isinstance(handle, ChatHandle):
        if handle is None:
            raise APIError(409, f"model {name!r} is not loaded", param="name", code="not_loaded")
        raise APIError(400, f"{name!r} is not a chat model: it has no replicas", param="name")
    engine = handle.engine
    try:
        state.registry.resize(name, len(engine.replicas), body.replicas)
    except InsufficientMemoryError as e:
        raise APIError(409, str(e), param="replicas", code="memory_budget") from None
    try:
        await engine.scale(body.replicas, body.grace)
    except PlacementError as e:
        raise APIError(400, str(e), param="replicas", code="cannot_place") from None
    except Exception as e:  # a new replica's core failed to start: the others serve on
        raise APIError(
            503, f"scaling {name!r} failed: {e}", type="service_unavailable", code="scale_failed"
        ) from None
    finally:  # the cost follows the replicas that actually run
        state.registry.resize(name, body.replicas, len(engine.replicas))
    return {"id": name, **engine_health(handle.engine)}
