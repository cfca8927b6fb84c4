"""Knowledge in conversations: which knowledge bases a conversation answers from, its own
attached files, and the sources saved with each knowledge-base answer.

Two tables of their own (the chat tables are unchanged):
- `conversation_kbs`: (conversation, knowledge base) pairs. `files_only` marks the
  conversation's own hidden knowledge base that holds the files attached to it (file chat):
  listed nowhere else, and deleted with the conversation.
- `message_sources`: an answer's passages and verified citation segments, as JSON.
Both go when their conversation, knowledge base or message goes (foreign keys, ON DELETE
CASCADE)."""

from __future__ import annotations

import json

from sqlalchemy import Boolean, ForeignKey, Text, delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from surge.app.db import Base
from surge.app.kb import store
from surge.app.kb.ingest import Ingestor
from surge.app.kb.store import KnowledgeBase
from surge.app.kb_schemas import Sources
from surge.app.models import Conversation, Message


class ConversationKB(Base):
    """A knowledge base a conversation answers from."""

    __tablename__ = "conversation_kbs"

    conversation_id: Mapped[int] = mapped_column(
        ForeignKey(Conversation.id, ondelete="CASCADE"), primary_key=True
    )
    kb_id: Mapped[int] = mapped_column(
        ForeignKey(KnowledgeBase.id, ondelete="CASCADE"), primary_key=True, index=True
    )
    files_only: Mapped[bool] = mapped_column(Boolean, default=False)


class MessageSources(Base):
    """The sources of a knowledge-base answer (a `kb_schemas.Sources` as JSON)."""

    __tablename__ = "message_sources"

    message_id: Mapped[int] = mapped_column(
        ForeignKey(Message.id, ondelete="CASCADE"), primary_key=True
    )
    sources: Mapped[str] = mapped_column(Text)


async def linked_kb_ids(db: AsyncSession, conversation_id: int) -> list[int]:
    """Every knowledge base the conversation answers from, its files' one included."""
    query = select(ConversationKB.kb_id).where(ConversationKB.conversation_id == conversation_id)
    return list((await db.scalars(query.order_by(ConversationKB.kb_id))).all())


async def attached_kb_ids(db: AsyncSession, conversation_id: int) -> list[int]:
    """The knowledge bases the user attached (not the conversation's own files)."""
    query = select(ConversationKB.kb_id).where(
        ConversationKB.conversation_id == conversation_id, ConversationKB.files_only.is_(False)
    )
    return list((await db.scalars(query.order_by(ConversationKB.kb_id))).all())


async def files_kb_id(db: AsyncSession, conversation_id: int) -> int | None:
    """The conversation's own knowledge base of attached files, if it has one."""
    query = select(ConversationKB.kb_id).where(
        ConversationKB.conversation_id == conversation_id, ConversationKB.files_only.is_(True)
    )
    return await db.scalar(query)


async def hidden_kb_ids(db: AsyncSession, kb_ids: list[int]) -> set[int]:
    """Those of `kb_ids` that are a conversation's own files (left out of lists)."""
    query = select(ConversationKB.kb_id).where(
        ConversationKB.files_only.is_(True), ConversationKB.kb_id.in_(kb_ids)
    )
    return set((await db.scalars(query)).all())


async def set_attached(db: AsyncSession, conversation_id: int, kb_ids: list[int]) -> None:
    """Replace the attached knowledge bases (the files one stays). Commits."""
    await db.execute(
        delete(ConversationKB).where(
            ConversationKB.conversation_id == conversation_id,
            ConversationKB.files_only.is_(False),
        )
    )
    for kb_id in dict.fromkeys(kb_ids):
        db.add(ConversationKB(conversation_id=conversation_id, kb_id=kb_id, files_only=False))
    await db.commit()


async def ensure_files_kb(
    db: AsyncSession, conversation: Conversation, embedding_model: str
) -> KnowledgeBase:
    """The conversation's files knowledge base, made (private, hidden) on first use."""
    kb_id = await files_kb_id(db, conversation.id)
    if kb_id is not None:
        kb = await store.get_kb(db, kb_id)
        if kb is not None:
            return kb
    kb = await store.create_kb(
        db,
        owner_id=conversation.user_id,
        name=f"files of conversation {conversation.id}",
        embedding_model=embedding_model,
    )
    db.add(ConversationKB(conversation_id=conversation.id, kb_id=kb.id, files_only=True))
    await db.commit()
    return kb


async def save_sources(db: AsyncSession, message_id: int, sources: Sources) -> None:
    """Store an answer's sources in the caller's transaction (not committed here)."""
    db.add(MessageSources(message_id=message_id, sources=sources.model_dump_json()))


async def sources_by_message(db: AsyncSession, conversation_id: int) -> dict[int, Sources]:
    """The saved sources of a conversation's answers, by message id."""
    query = (
        select(MessageSources.message_id, MessageSources.sources)
        .join(Message, Message.id == MessageSources.message_id)
        .where(Message.conversation_id == conversation_id)
        .order_by(MessageSources.message_id)
    )
    rows = (await db.execute(query)).all()
    return {message_id: Sources.model_validate(json.loads(text)) for message_id, text in rows}


async def delete_files_kb(db: AsyncSession, ingestor: Ingestor, conversation_id: int) -> None:
    """Delete the conversation's files knowledge base (its jobs stopped, its files removed);
    called before the conversation itself is deleted."""
    kb_id = await files_kb_id(db, conversation_id)
    await db.commit()  # end this session's transaction: the ingestor writes with its own
    if kb_id is not None:
        await ingestor.delete_kb(kb_id)
