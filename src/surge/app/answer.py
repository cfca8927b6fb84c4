"""Streaming one answer: relay the model service's stream to the browser as simple SSE events,
then save the assistant message (complete, stopped by the user, or failed).

The browser sees `data: {...}` events:
  {"type": "start", "user_message_id": 12}
  {"type": "status", "state": "waiting" | "generating"}
  {"type": "delta", "text": "..."}
  {"type": "done", "message_id": 13, "model": "...", "usage": {...} | null}
  {"type": "error", "status": 429, "message": "...", "retryable": true, "message_id": 13}
and `: keep-alive` comments while the service keeps the request queued.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

import anyio
from sqlalchemy import update
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from surge.app.deps import AppState
from surge.app.models import Conversation, Message, MessageStatus, User, utcnow
from surge.app.upstream import ChatEvent, Delta, KeepAlive, UpstreamError, Usage

logger = logging.getLogger(__name__)

KEEPALIVE = ": keep-alive\n\n"


# Line separators some line splitters break on (Python's str.splitlines): escaped in the JSON,
# which stays the same value. JSON itself escapes \r and \n.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(body: dict[str, object]) -> str:
    """One SSE event carrying a JSON body, on one line."""
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)
    return f"data: {text}\n\n"


class SSEResponse(StreamingResponse):
    """A streaming response that always watches for the browser leaving.

    Starlette watches only under ASGI spec < 2.4; otherwise it notices a gone client when a
    write fails, which never happens while the service sends nothing. Here a closed browser
    stream cancels the relay at once, and the relay closes the service's request.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client went away mid-write
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


@dataclass(slots=True)
class AnswerJob:
    """One answer to produce: who asks, in which conversation, with what."""

    user_id: int
    conversation_id: int
    user_message_id: int
    model: str | None  # None: the configured default, else the service's first chat model
    messages: list[dict[str, str]]
    temperature: float | None
    text: list[str] = field(default_factory=list)
    usage: Usage | None = None


async def resolve_model(job: AnswerJob, state: AppState) -> str:
    """The model to ask (UpstreamError when none is named and the service lists none)."""
    if job.model:
        return job.model
    if state.config.default_model:
        return state.config.default_model
    models = await state.upstream.chat_models()
    if not models:
        raise UpstreamError(503, "The model service offers no chat model.", retryable=True)
    return models[0]


async def relay(job: AnswerJob, state: AppState) -> AsyncIterator[str]:
    """The SSE body. However it ends — done, an error, the browser gone — the service's request
    is closed and the answer (or its part) is saved."""
    outcome: tuple[MessageStatus, str | None] = (MessageStatus.STOPPED, None)
    model = job.model
    stream: AsyncGenerator[ChatEvent, None] | None = None
    error: dict[str, object] = {}
    try:
        yield sse({"type": "start", "user_message_id": job.user_message_id})
        yield sse({"type": "status", "state": "waiting"})
        model = await resolve_model(job, state)
        await _count_request(state, job.user_id)
        stream = state.upstream.stream_chat(model, job.messages, job.temperature)
        async for item in stream:
            if isinstance(item, Delta):
                if not job.text:
                    yield sse({"type": "status", "state": "generating"})
                job.text.append(item.text)
                yield sse({"type": "delta", "text": item.text})
            elif isinstance(item, Usage):
                job.usage = item
            elif isinstance(item, KeepAlive):
                yield KEEPALIVE
        outcome = (MessageStatus.COMPLETE, None)
    except UpstreamError as e:
        outcome = (MessageStatus.ERROR, e.message)
        error = {"status": e.status, "message": e.message}
        error |= {"retryable": e.retryable, "retry_after_s": e.retry_after_s}
    except Exception as e:  # noqa: BLE001 - a surprise must still end as an event, not a hang
        logger.exception("answer for conversation %d failed", job.conversation_id)
        outcome = (MessageStatus.ERROR, f"The app failed while answering ({type(e).__name__}).")
        error = {"status": 500, "message": outcome[1], "retryable": True}
    finally:
        # runs on cancellation too (the browser left): shield the cleanup from that cancel
        with anyio.CancelScope(shield=True):
            if stream is not None:
                await stream.aclose()
            message_id = await _save(job, state, model, *outcome)
    if outcome[0] is MessageStatus.COMPLETE:
        usage = None
        if job.usage is not None:
            usage = {
                "prompt_tokens": job.usage.prompt_tokens,
                "completion_tokens": job.usage.completion_tokens,
            }
        yield sse({"type": "done", "message_id": message_id, "model": model, "usage": usage})
    else:
        yield sse({"type": "error", "message_id": message_id, **error})


async def _count_request(state: AppState, user_id: int) -> None:
    async with state.sessions() as db:
        await db.execute(
            update(User).where(User.id == user_id).values(num_requests=User.num_requests + 1)
        )
        await db.commit()


async def _save(
    job: AnswerJob, state: AppState, model: str | None, status: MessageStatus, error: str | None
) -> int | None:
    """Store the assistant message and the user's token counts; the message id (None if the
    conversation was deleted meanwhile)."""
    usage = job.usage
    try:
        async with state.sessions() as db:
            conversation = await db.get(Conversation, job.conversation_id)
            if conversation is None:
                return None
            message = Message(
                conversation_id=job.conversation_id,
                role="assistant",
                content="".join(job.text),
                status=status,
                error=error,
                model=model,
                num_tokens_in=usage.prompt_tokens if usage else None,
                num_tokens_out=usage.completion_tokens if usage else None,
            )
            db.add(message)
            conversation.updated_at = utcnow()
            if usage is not None:
                await db.execute(
                    update(User)
                    .where(User.id == job.user_id)
                    .values(
                        num_tokens_in=User.num_tokens_in + usage.prompt_tokens,
                        num_tokens_out=User.num_tokens_out + usage.completion_tokens,
                    )
                )
            await db.commit()
            return message.id
    except Exception:  # noqa: BLE001 - the stream's end must not turn into a 500
        logger.exception("saving the answer of conversation %d failed", job.conversation_id)
        return None
