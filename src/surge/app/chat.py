"""Chat routes: send a message, regenerate, edit-and-resend (each streams the answer), and the
chat models the service offers."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import delete, select

from surge.app.answer import AnswerJob, SSEResponse, relay
from surge.app.auth import CurrentUser
from surge.app.conversations import OwnedConversation
from surge.app.deps import Db, State
from surge.app.errors import AppError, not_found
from surge.app.kb_answer import relay_with_sources
from surge.app.kb_links import linked_kb_ids
from surge.app.models import Conversation, Message, utcnow
from surge.app.schemas import MessageIn, ModelsOut
from surge.app.upstream import UpstreamError

router = APIRouter(prefix="/api", tags=["chat"])

TITLE_CHARS = 60


async def _history(db: Db, conversation: Conversation) -> list[Message]:
    query = select(Message).where(Message.conversation_id == conversation.id).order_by(Message.id)
    return list((await db.scalars(query)).all())


def _job(user_id: int, conversation: Conversation, history: list[Message]) -> AnswerJob:
    """What to send the service: the system prompt and every turn with text (an empty stopped
    or failed answer is left out)."""
    messages = []
    if conversation.system_prompt:
        messages.append({"role": "system", "content": conversation.system_prompt})
    messages += [{"role": m.role, "content": m.content} for m in history if m.content]
    return AnswerJob(
        user_id=user_id,
        conversation_id=conversation.id,
        user_message_id=history[-1].id,
        model=conversation.model,
        messages=messages,
        temperature=conversation.temperature,
    )


async def _answer(db: Db, state: State, user_id: int, conversation: Conversation) -> SSEResponse:
    """Commit the changes made to the conversation, then stream a new answer to its last turn.

    The commit also hands the database connection back before the stream starts: a long answer
    holds no connection (the relay opens its own to save)."""
    conversation.updated_at = utcnow()
    job = _job(user_id, conversation, await _history(db, conversation))  # sees unflushed changes
    kb_ids = await linked_kb_ids(db, conversation.id)
    await db.commit()
    if kb_ids:  # knowledge bases or files attached: answer from them, with citations
        return SSEResponse(relay_with_sources(job, state, kb_ids))
    return SSEResponse(relay(job, state))


@router.post("/conversations/{conversation_id}/messages", operation_id="send_message")
async def send_message(
    body: MessageIn, conversation: OwnedConversation, user: CurrentUser, db: Db, state: State
) -> SSEResponse:
    """Store the user's message and stream the answer (SSE; see surge.app.answer)."""
    db.add(Message(conversation_id=conversation.id, role="user", content=body.content))
    if not conversation.title:
        conversation.title = body.content.strip().splitlines()[0][:TITLE_CHARS]
    return await _answer(db, state, user.id, conversation)


@router.post("/conversations/{conversation_id}/regenerate", operation_id="regenerate")
async def regenerate(
    conversation: OwnedConversation, user: CurrentUser, db: Db, state: State
) -> SSEResponse:
    """Drop the last answer (if the last turn is one) and answer the last user message again;
    also how the browser retries after an error."""
    history = await _history(db, conversation)
    if history and history[-1].role == "assistant":
        await db.delete(history.pop())
    if not history:
        raise AppError(400, "nothing_to_regenerate", "the conversation has no message to answer")
    return await _answer(db, state, user.id, conversation)


@router.put(
    "/conversations/{conversation_id}/messages/{message_id}", operation_id="edit_and_resend"
)
async def edit_and_resend(
    message_id: int,
    body: MessageIn,
    conversation: OwnedConversation,
    user: CurrentUser,
    db: Db,
    state: State,
) -> SSEResponse:
    """Replace a user message's text, drop every turn after it, and answer it again."""
    message = await db.get(Message, message_id)
    if message is None or message.conversation_id != conversation.id:
        raise not_found("message")
    if message.role != "user":
        raise AppError(400, "not_a_user_message", "only your own messages can be edited")
    message.content = body.content
    await db.execute(
        delete(Message).where(Message.conversation_id == conversation.id, Message.id > message.id)
    )
    return await _answer(db, state, user.id, conversation)


@router.get("/models", operation_id="list_models")
async def list_models(_user: CurrentUser, state: State) -> ModelsOut:
    """The chat models of the model service (embedding and rerank models left out)."""
    try:
        return ModelsOut(models=await state.upstream.chat_models())
    except UpstreamError as e:
        raise AppError(e.status, "upstream", e.message) from e
