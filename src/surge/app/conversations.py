"""Conversations: each owned by one user, who alone can see it (anyone else gets 404)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from sqlalchemy import exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from surge.app.auth import CurrentUser
from surge.app.deps import Db, State
from surge.app.errors import not_found
from surge.app.kb_links import delete_files_kb
from surge.app.models import Conversation, Message, utcnow
from surge.app.schemas import ConversationDetail, ConversationIn, ConversationOut

router = APIRouter(prefix="/api/conversations", tags=["conversations"])


async def load_owned(
    db: AsyncSession, conversation_id: int, user_id: int, *, with_messages: bool = False
) -> Conversation:
    """The conversation if `user_id` owns it; 404 otherwise (whether or not it exists)."""
    query = select(Conversation).where(
        Conversation.id == conversation_id, Conversation.user_id == user_id
    )
    if with_messages:
        query = query.options(selectinload(Conversation.messages))
    conversation = await db.scalar(query)
    if conversation is None:
        raise not_found("conversation")
    return conversation


async def owned_conversation(conversation_id: int, user: CurrentUser, db: Db) -> Conversation:
    """Dependency: the path's conversation, owned by the current user (the one ownership check)."""
    return await load_owned(db, conversation_id, user.id)


OwnedConversation = Annotated[Conversation, Depends(owned_conversation)]


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


@router.get("", operation_id="list_conversations")
async def list_conversations(
    user: CurrentUser,
    db: Db,
    q: Annotated[str | None, Query(max_length=500)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[ConversationOut]:
    """The user's conversations, most recently active first; `q` searches titles and messages."""
    query = select(Conversation).where(Conversation.user_id == user.id)
    if q:
        pattern = _like(q)
        in_messages = exists().where(
            Message.conversation_id == Conversation.id,
            Message.content.ilike(pattern, escape="\\"),
        )
        query = query.where(or_(Conversation.title.ilike(pattern, escape="\\"), in_messages))
    query = query.order_by(Conversation.updated_at.desc(), Conversation.id.desc())
    rows = (await db.scalars(query.limit(limit).offset(offset))).all()
    return [ConversationOut.model_validate(c) for c in rows]


@router.post("", status_code=201, operation_id="create_conversation")
async def create_conversation(body: ConversationIn, user: CurrentUser, db: Db) -> ConversationOut:
    """A new, empty conversation (title, model, system prompt, temperature all optional)."""
    conversation = Conversation(
        user_id=user.id,
        title=body.title or "",
        model=body.model,
        system_prompt=body.system_prompt or "",
        temperature=body.temperature,
    )
    db.add(conversation)
    await db.commit()
    return ConversationOut.model_validate(conversation)


@router.get("/{conversation_id}", operation_id="get_conversation")
async def get_conversation(conversation_id: int, user: CurrentUser, db: Db) -> ConversationDetail:
    """The conversation with its messages in order."""
    conversation = await load_owned(db, conversation_id, user.id, with_messages=True)
    return ConversationDetail.model_validate(conversation)


@router.patch("/{conversation_id}", operation_id="update_conversation")
async def update_conversation(
    body: ConversationIn, conversation: OwnedConversation, db: Db
) -> ConversationOut:
    """Rename, or change the model, system prompt or temperature (only the fields sent)."""
    for name in body.model_fields_set:
        value = getattr(body, name)
        if name in ("title", "system_prompt") and value is None:
            value = ""
        setattr(conversation, name, value)
    conversation.updated_at = utcnow()
    await db.commit()
    return ConversationOut.model_validate(conversation)


@router.delete("/{conversation_id}", status_code=204, operation_id="delete_conversation")
async def delete_conversation(conversation: OwnedConversation, db: Db, state: State) -> Response:
    """Delete the conversation and its messages, and the files attached to it (file chat)."""
    if state.kb is not None:
        await delete_files_kb(db, state.kb.ingestor, conversation.id)
    await db.delete(conversation)
    await db.commit()
    return Response(status_code=204)
