"""The app's shared state (built in the lifespan) and the dependencies every route uses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from surge.app.config import AppConfig
from surge.app.security import RateLimiter
from surge.app.upstream import Upstream

if TYPE_CHECKING:
    from surge.app.kb_service import KnowledgeService


@dataclass(slots=True)
class AppState:
    """What the lifespan builds once: the store, the model-service client, the rate limiter,
    the knowledge bases' service."""

    config: AppConfig
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    upstream: Upstream
    limiter: RateLimiter
    signup_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    kb: KnowledgeService | None = None


def get_state(request: Request) -> AppState:
    """The app's state (works mounted under another app too: it is on the app's own state)."""
    return request.app.state.surge_app


async def get_db(state: Annotated[AppState, Depends(get_state)]) -> AsyncIterator[AsyncSession]:
    """One database session per request."""
    async with state.sessions() as session:
        yield session


State = Annotated[AppState, Depends(get_state)]
Db = Annotated[AsyncSession, Depends(get_db)]
