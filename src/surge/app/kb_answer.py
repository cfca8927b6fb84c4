"""Knowledge-base answers: retrieve passages from one or more knowledge bases, ask the model
with them numbered (`cite.build_prompt`), stream the answer, then check its citations
(`cite.verify_citations`).

The events are those of a chat answer (surge.app.answer), plus a "retrieving" status, and the
final `done` event carries the sources:
  {"type": "start", "user_message_id": 12 | null}
  {"type": "status", "state": "retrieving" | "waiting" | "generating"}
  {"type": "delta", "text": "..."}
  {"type": "done", "message_id": 13 | null, "model": "..." | null, "usage": {...} | null,
   "found": true, "passages": [{"number": 1, "chunk_id", "document_id", "file_name", "page",
   "heading", "text"}], "segments": [{"type": "text" | "citation" | "unverified", "text",
   "number"}], "cited": [1]}
  {"type": "error", "status": 502, "message": "...", "retryable": true, "message_id": ...}
When nothing relevant is retrieved the model is not asked: the answer is the knowledge base's
"not found" sentence and `found` is false. In a conversation the answer is saved as its
assistant message with its sources (`kb_links.MessageSources`), so a reload shows them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from sqlalchemy import update

from surge.app.answer import KEEPALIVE, AnswerJob, sse
from surge.app.deps import AppState
from surge.app.errors import AppError
from surge.app.kb import store
from surge.app.kb.cite import RagPrompt, build_prompt, cited_passages, verify_citations
from surge.app.kb.followup import SearchQuery
from surge.app.kb.index import Hit, SearchMode
from surge.app.kb_links import save_sources
from surge.app.kb_query import PlannedQuery, plan_query, resolve_model
from surge.app.kb_schemas import NumberedPassage, PassageOut, SegmentOut, Sources
from surge.app.models import Conversation, Message, MessageStatus, User, utcnow
from surge.app.upstream import Delta, KeepAlive, UpstreamError, Usage

logger = logging.getLogger(__name__)

Event = dict[str, object] | None  # None: a keep-alive (the service still has it queued)


@dataclass(slots=True)
class Question:
    """A question to answer from knowledge bases, and the conversation around it."""

    user_id: int
    kb_ids: list[int]
    text: str
    history: list[dict[str, str]]  # messages before it: a system prompt, earlier turns
    model: str | None
    temperature: float | None
    top_k: int = 5

    def user_turns(self) -> list[str]:
        """The user's earlier turns and this question, oldest first (what a follow-up needs)."""
        earlier = [m["content"] for m in self.history if m["role"] == "user"]
        return [*earlier, self.text]


@dataclass(slots=True)
class Outcome:
    """How an answer ended, what to save."""

    status: MessageStatus = MessageStatus.STOPPED
    error: str | None = None
    model: str | None = None
    asked: bool = False  # the model service was asked (a request to count)
    text: list[str] = field(default_factory=list)
    usage: Usage | None = None
    sources: Sources | None = None
    query: PlannedQuery | None = None  # what was searched (a rewrite asked the model too)


Save = Callable[[Outcome], Awaitable[int | None]]  # → the saved message's id, if any


async def retrieve(state: AppState, question: Question, query: SearchQuery) -> list[Hit]:
    """The best passages for `query` of the knowledge bases the user may still read, best first
    (hybrid scores are absolute, so those of different knowledge bases compare)."""
    service = state.kb
    assert service is not None  # the routes that get here depend on it
    async with state.sessions() as db:
        user = await db.get(User, question.user_id)
        kbs = [await store.get_kb(db, kb_id) for kb_id in question.kb_ids]
    readable = [kb for kb in kbs if kb and user and store.can_read(kb, user.id, user.is_admin)]
    results = await asyncio.gather(
        *(
            service.search(kb, query, top_k=question.top_k, mode=SearchMode.HYBRID)
            for kb in readable
        )
    )
    hits = [h for hits in results for h in hits]
    if hits and all(h.rerank is not None for h in hits):  # one cross-encoder scored them all
        return sorted(hits, key=lambda h: -(h.rerank or 0.0))[: question.top_k]
    return sorted(hits, key=lambda h: -h.hybrid)[: question.top_k]


def messages_for(question: Question, prompt: RagPrompt) -> list[dict[str, str]]:
    """The RAG prompt with the conversation's earlier turns between its two messages (one
    system message: the conversation's own system prompt follows the RAG instructions)."""
    system, user = prompt.messages
    history = list(question.history)
    if history and history[0]["role"] == "system":
        extra = history.pop(0)["content"]
        system = {"role": "system", "content": f"{system['content']}\n\n{extra}"}
    return [system, *history, user]


def sources_of(prompt: RagPrompt, answer: str) -> Sources:
    """The numbered passages and the answer's verified citation segments."""
    segments = verify_citations(answer, prompt.passages)
    return Sources(
        found=prompt.found,
        passages=[
            NumberedPassage(number=number, **PassageOut.of(passage).model_dump())
            for number, passage in enumerate(prompt.passages, 1)
        ],
        segments=[SegmentOut.of(segment) for segment in segments],
        cited=[number for number, _ in cited_passages(segments)],
    )


async def _generate(
    state: AppState, question: Question, prompt: RagPrompt, outcome: Outcome
) -> AsyncIterator[Event]:
    """Ask the model (or, with nothing relevant retrieved, give the "not found" sentence)."""
    if not prompt.found:
        outcome.text.append(prompt.not_found_text)
        yield {"type": "delta", "text": prompt.not_found_text}
        return
    yield {"type": "status", "state": "waiting"}
    outcome.model = await resolve_model(state, question.model)
    outcome.asked = True
    stream = state.upstream.stream_chat(
        outcome.model, messages_for(question, prompt), question.temperature
    )
    try:
        async for item in stream:
            if isinstance(item, Delta):
                if not outcome.text:
                    yield {"type": "status", "state": "generating"}
                outcome.text.append(item.text)
                yield {"type": "delta", "text": item.text}
            elif isinstance(item, Usage):
                outcome.usage = item
            elif isinstance(item, KeepAlive):
                yield None
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()  # closing the request aborts the generation


async def answer_events(state: AppState, question: Question, save: Save) -> AsyncIterator[Event]:
    """The answer's events after `start`. However it ends (done, an error, the client gone),
    the service's request is closed and `save` gets the outcome."""
    outcome = Outcome()
    prompt: RagPrompt | None = None
    error: dict[str, object] = {}
    try:
        yield {"type": "status", "state": "retrieving"}
        outcome.query = await plan_query(state, question.user_turns(), question.model)
        hits = await retrieve(state, question, outcome.query.query)
        prompt = build_prompt(question.text, hits)
        async for event in _generate(state, question, prompt, outcome):
            yield event
        outcome.status = MessageStatus.COMPLETE
    except (UpstreamError, AppError) as e:
        retryable = e.retryable if isinstance(e, UpstreamError) else e.status >= 500
        retry_after = e.retry_after_s if isinstance(e, UpstreamError) else None
        outcome.status, outcome.error = MessageStatus.ERROR, e.message
        error = {"status": e.status, "message": e.message, "retryable": retryable}
        error["retry_after_s"] = retry_after
    except Exception as e:  # noqa: BLE001 - a surprise must still end as an event, not a hang
        logger.exception("knowledge-base answer failed")
        outcome.status = MessageStatus.ERROR
        outcome.error = f"The app failed while answering ({type(e).__name__})."
        error = {"status": 500, "message": outcome.error, "retryable": True}
    finally:
        with anyio.CancelScope(shield=True):
            if prompt is not None:
                outcome.sources = sources_of(prompt, "".join(outcome.text))
            message_id = await save(outcome)
    if outcome.status is MessageStatus.COMPLETE and outcome.sources is not None:
        usage = None
        if outcome.usage is not None:
            usage = {
                "prompt_tokens": outcome.usage.prompt_tokens,
                "completion_tokens": outcome.usage.completion_tokens,
            }
        done = {"type": "done", "message_id": message_id, "model": outcome.model, "usage": usage}
        yield done | outcome.sources.model_dump()
    else:
        yield {"type": "error", "message_id": message_id, **error}


async def to_sse(start: dict[str, object], events: AsyncIterator[Event]) -> AsyncIterator[str]:
    """The SSE body: the `start` event, then the answer's."""
    yield sse(start)
    async for event in events:
        yield KEEPALIVE if event is None else sse(event)


def _count_usage(outcome: Outcome, user_id: int):  # type: ignore[no-untyped-def]
    """The user's counters after an answer: one request if the model was asked (and one if it
    rewrote the question), their tokens."""
    planned = outcome.query or PlannedQuery(SearchQuery(""))
    usages = [u for u in (outcome.usage, planned.usage) if u is not None]
    return (
        update(User)
        .where(User.id == user_id)
        .values(
            num_requests=User.num_requests + int(outcome.asked) + int(planned.asked),
            num_tokens_in=User.num_tokens_in + sum(u.prompt_tokens for u in usages),
            num_tokens_out=User.num_tokens_out + sum(u.completion_tokens for u in usages),
        )
    )


def usage_saver(state: AppState, user_id: int) -> Save:
    """For an answer outside a conversation (an ask): only the user's usage is saved."""

    async def save(outcome: Outcome) -> None:
        if not outcome.asked and not (outcome.query and outcome.query.asked):
            return None
        try:
            async with state.sessions() as db:
                await db.execute(_count_usage(outcome, user_id))
                await db.commit()
        except Exception:  # noqa: BLE001 - the stream's end must not turn into a 500
            logger.exception("counting the usage of user %d failed", user_id)
        return None

    return save


def message_saver(state: AppState, job: AnswerJob) -> Save:
    """For an answer in a conversation: the assistant message with its sources, and the usage."""

    async def save(outcome: Outcome) -> int | None:
        try:
            async with state.sessions() as db:
                if outcome.asked or (outcome.query and outcome.query.asked):
                    await db.execute(_count_usage(outcome, job.user_id))
                conversation = await db.get(Conversation, job.conversation_id)
                if conversation is None:  # deleted meanwhile
                    await db.commit()
                    return None
                message = Message(
                    conversation_id=job.conversation_id,
                    role="assistant",
                    content="".join(outcome.text),
                    status=outcome.status,
                    error=outcome.error,
                    model=outcome.model,
                    num_tokens_in=outcome.usage.prompt_tokens if outcome.usage else None,
                    num_tokens_out=outcome.usage.completion_tokens if outcome.usage else None,
                )
                db.add(message)
                conversation.updated_at = utcnow()
                await db.flush()
                if outcome.sources is not None:
                    await save_sources(db, message.id, outcome.sources)
                await db.commit()
                return message.id
        except Exception:  # noqa: BLE001 - the stream's end must not turn into a 500
            logger.exception("saving the answer of conversation %d failed", job.conversation_id)
            return None

    return save


def relay_with_sources(job: AnswerJob, state: AppState, kb_ids: list[int]) -> AsyncIterator[str]:
    """A conversation's answer from its knowledge bases (what `answer.relay` is for a plain
    chat): the last user message is the question, the turns before it the history."""
    question = Question(
        user_id=job.user_id,
        kb_ids=kb_ids,
        text=job.messages[-1]["content"],
        history=job.messages[:-1],
        model=job.model,
        temperature=job.temperature,
    )
    start: dict[str, object] = {"type": "start", "user_message_id": job.user_message_id}
    return to_sse(start, answer_events(state, question, message_saver(state, job)))
