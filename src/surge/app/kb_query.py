"""What a knowledge-base answer searches for: the question with the conversation it follows
(`kb.followup.conversation_query`), or, when the admin turned query rewriting on, the chat
model's standalone rewrite of a follow-up (one extra, short request to the model service).

A rewrite that fails (an error, a timeout, an answer that isn't a query) falls back to the
conversation's query: it never fails the answer. A standalone question is never rewritten."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
from sqlalchemy.ext.asyncio import AsyncSession

from surge.app.deps import AppState
from surge.app.kb.followup import SearchQuery, clean_rewrite, conversation_query, rewrite_messages
from surge.app.models import Setting
from surge.app.upstream import Delta, UpstreamError, Usage

logger = logging.getLogger(__name__)

REWRITE_QUERIES = "rewrite_queries"  # the admin setting's key
REWRITE_TIMEOUT_S = 20.0  # the longest a rewrite may delay retrieval before it is given up


@dataclass(frozen=True, slots=True)
class PlannedQuery:
    """The query to search, and whether the model service was asked for it (and its usage)."""

    query: SearchQuery
    asked: bool = False
    usage: Usage | None = None


async def rewrite_enabled(db: AsyncSession) -> bool:
    """Whether follow-ups are rewritten by the chat model (admin setting; off by default)."""
    row = await db.get(Setting, REWRITE_QUERIES)
    return row is not None and row.value == "1"


async def resolve_model(state: AppState, requested: str | None) -> str:
    """The model asked for, else the configured default, else the service's first chat model."""
    if requested or state.config.default_model:
        return requested or state.config.default_model  # type: ignore[return-value]
    models = await state.upstream.chat_models()
    if not models:
        raise UpstreamError(503, "The model service offers no chat model.", retryable=True)
    return models[0]


async def plan_query(
    state: AppState, user_turns: Sequence[str], requested_model: str | None
) -> PlannedQuery:
    """The search for the last of `user_turns` (see the module doc)."""
    query = conversation_query(user_turns)
    if not query.context:
        return PlannedQuery(query)
    async with state.sessions() as db:
        if not await rewrite_enabled(db):
            return PlannedQuery(query)
    text: list[str] = []
    usage: Usage | None = None
    asked = False
    try:
        with anyio.fail_after(REWRITE_TIMEOUT_S):
            model = await resolve_model(state, requested_model)
            asked = True
            stream = state.upstream.stream_chat(model, rewrite_messages(user_turns), 0.0)
            try:
                async for item in stream:
                    if isinstance(item, Delta):
                        text.append(item.text)
                    elif isinstance(item, Usage):
                        usage = item
            finally:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
    except (UpstreamError, TimeoutError) as e:
        message = e.message if isinstance(e, UpstreamError) else "timed out"
        logger.warning("rewriting a follow-up failed, searching the conversation: %s", message)
        return PlannedQuery(query, asked, usage)
    rewritten = clean_rewrite("".join(text))
    if rewritten is None:
        return PlannedQuery(query, asked, usage)
    return PlannedQuery(SearchQuery(rewritten), asked, usage)
