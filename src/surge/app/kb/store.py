"""Knowledge-base tables and the functions that read and change them.

Every change that alters what a knowledge base retrieves (a document finished, deleted or
reset) bumps the knowledge base's `index_version` in the same transaction, which is how
`cache.IndexCache` knows to rebuild, even when several app processes share one database.
Access rules live here too (`can_read`, `can_write`), so routes check them in one place."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import NamedTuple

import numpy as np
from sqlalchemy import (
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from surge.app.db import Base
from surge.app.kb.split import DEFAULT_CHUNK_SIZE, DEFAULT_OVERLAP, SplitConfig


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Visibility(str, enum.Enum):
    PRIVATE = "private"  # the owner (and admins) only
    SHARED_READ = "shared_read"  # every user may search it; the owner changes it
    SHARED_WRITE = "shared_write"  # every user may also add and remove documents


class DocumentStatus(str, enum.Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_active(self) -> bool:
        """Waiting for or inside an ingestion job."""
        return self in ACTIVE_STATUSES


ACTIVE_STATUSES = (DocumentStatus.QUEUED, DocumentStatus.PROCESSING)


class KnowledgeBase(Base):
    """A named set of documents with one owner, one visibility and one way of splitting."""

    __tablename__ = "knowledge_bases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # `users.id`, as a plain indexed integer rather than a foreign key: a key declared only
    # when the accounts module happened to be imported first would make the schema depend on
    # import order. Routes take the owner from the logged-in user, who exists.
    owner_id: Mapped[int] = mapped_column(Integer, index=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    visibility: Mapped[Visibility] = mapped_column(
        Enum(Visibility, native_enum=False, length=16), default=Visibility.PRIVATE
    )
    chunk_size: Mapped[int] = mapped_column(Integer, default=DEFAULT_CHUNK_SIZE)
    overlap: Mapped[int] = mapped_column(Integer, default=DEFAULT_OVERLAP)
    embedding_model: Mapped[str] = mapped_column(String(200), default="")
    index_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)


class Document(Base):
    """An uploaded file of a knowledge base and its ingestion state."""

    __tablename__ = "kb_documents"
    __table_args__ = (UniqueConstraint("kb_id", "content_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kb_id: Mapped[int] = mapped_column(
        ForeignKey("knowledge_bases.id", ondelete="CASCADE"), index=True
    )
    file_name: Mapped[str] = mapped_column(String(255))
    content_sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    status: Mapped[DocumentStatus] = mapped_column(
        Enum(DocumentStatus, native_enum=False, length=16), default=DocumentStatus.QUEUED
    )
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0 to 1
    error: Mapped[str | None] = mapped_column(Text, default=None)
    num_chunks: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)


class ChunkRow(Base):
    """A stored chunk: its text and origin, its BM25 tokens and its embedding (float32)."""

    __tablename__ = "kb_chunks"
    __table_args__ = (UniqueConstraint("document_id", "ordinal"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("kb_documents.id", ondelete="CASCADE"))
    kb_id: Mapped[int] = mapped_column(
        ForeignKey("knowledge_bases.id", ondelete="CASCADE"), index=True
    )
    ordinal: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    page: Mapped[int | None] = mapped_column(Integer, default=None)
    heading: Mapped[str | None] = mapped_column(String(300), default=None)
    tokens: Mapped[str] = mapped_column(Text)  # space-separated: the persisted keyword index
    embedding: Mapped[bytes] = mapped_column(LargeBinary)


def can_read(kb: KnowledgeBase, user_id: int, is_admin: bool = False) -> bool:
    """Search it, read its documents and passages."""
    return is_admin or kb.owner_id == user_id or kb.visibility is not Visibility.PRIVATE


def can_write(kb: KnowledgeBase, user_id: int, is_admin: bool = False) -> bool:
    """Add, re-index and delete its documents."""
    return is_admin or kb.owner_id == user_id or kb.visibility is Visibility.SHARED_WRITE


async def create_kb(
    session: AsyncSession,
    *,
    owner_id: int,
    name: str,
    description: str = "",
    visibility: Visibility = Visibility.PRIVATE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    embedding_model: str = "",
) -> KnowledgeBase:
    """A new, empty knowledge base (its split settings are checked here)."""
    SplitConfig(chunk_size, overlap)  # raises ValueError on bad settings
    kb = KnowledgeBase(
        owner_id=owner_id,
        name=name,
        description=description,
        visibility=visibility,
        chunk_size=chunk_size,
        overlap=overlap,
        embedding_model=embedding_model,
    )
    session.add(kb)
    await session.commit()
    return kb


async def get_kb(session: AsyncSession, kb_id: int) -> KnowledgeBase | None:
    return await session.get(KnowledgeBase, kb_id)


async def list_kbs(
    session: AsyncSession, *, user_id: int, is_admin: bool = False
) -> list[KnowledgeBase]:
    """The knowledge bases a user may read: their own and shared ones (all, for an admin)."""
    query = select(KnowledgeBase).order_by(KnowledgeBase.id)
    if not is_admin:
        query = query.where(
            or_(KnowledgeBase.owner_id == user_id, KnowledgeBase.visibility != Visibility.PRIVATE)
        )
    return list((await session.scalars(query)).all())


async def delete_kb(session: AsyncSession, kb_id: int) -> list[str]:
    """Delete a knowledge base with its documents and chunks; the deleted files' hashes."""
    hashes = await session.scalars(select(Document.content_sha256).where(Document.kb_id == kb_id))
    hashes_list = list(hashes.all())
    await session.execute(delete(ChunkRow).where(ChunkRow.kb_id == kb_id))
    await session.execute(delete(Document).where(Document.kb_id == kb_id))
    await session.execute(delete(KnowledgeBase).where(KnowledgeBase.id == kb_id))
    await session.commit()
    return hashes_list


async def list_documents(session: AsyncSession, kb_id: int) -> list[Document]:
    query = select(Document).where(Document.kb_id == kb_id).order_by(Document.id)
    return list((await session.scalars(query)).all())


async def get_document(session: AsyncSession, document_id: int) -> Document | None:
    return await session.get(Document, document_id)


async def add_document(
    session: AsyncSession, *, kb_id: int, file_name: str, sha256: str, size_bytes: int
) -> tuple[Document, bool]:
    """A QUEUED document, or the knowledge base's existing one with the same content; the
    flag says whether it is new. Concurrent uploads of one file resolve to one row."""
    existing = await _document_by_hash(session, kb_id, sha256)
    if existing is not None:
        return existing, False
    document = Document(
        kb_id=kb_id, file_name=file_name, content_sha256=sha256, size_bytes=size_bytes
    )
    session.add(document)
    try:
        await session.commit()
    except Exception:  # IntegrityError: another upload of the same bytes committed first
        await session.rollback()
        existing = await _document_by_hash(session, kb_id, sha256)
        if existing is None:
            raise
        return existing, False
    return document, True


async def _document_by_hash(session: AsyncSession, kb_id: int, sha256: str) -> Document | None:
    query = select(Document).where(Document.kb_id == kb_id, Document.content_sha256 == sha256)
    return await session.scalar(query)


async def delete_document(session: AsyncSession, document_id: int) -> str | None:
    """Delete a document and its chunks; its file's hash, or None if there was none."""
    document = await session.get(Document, document_id)
    if document is None:
        return None
    sha256, kb_id = document.content_sha256, document.kb_id
    await session.execute(delete(ChunkRow).where(ChunkRow.document_id == document_id))
    await session.execute(delete(Document).where(Document.id == document_id))
    await _bump_version(session, kb_id)
    await session.commit()
    return sha256


async def is_file_used(session: AsyncSession, sha256: str) -> bool:
    """Whether any document (in any knowledge base) still holds these bytes."""
    query = select(func.count()).select_from(Document).where(Document.content_sha256 == sha256)
    return bool(await session.scalar(query))


async def requeue_document(session: AsyncSession, document_id: int) -> bool:
    """Drop a document's chunks and queue it again (re-index); False if it is in a job now."""
    result = await session.execute(
        update(Document)
        .where(Document.id == document_id, Document.status.not_in(ACTIVE_STATUSES))
        .values(status=DocumentStatus.QUEUED, progress=0.0, error=None, num_chunks=0)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        return False
    kb_id = await session.scalar(select(Document.kb_id).where(Document.id == document_id))
    await session.execute(delete(ChunkRow).where(ChunkRow.document_id == document_id))
    await _bump_version(session, kb_id)
    await session.commit()
    return True


async def set_status(
    session: AsyncSession,
    document_id: int,
    status: DocumentStatus,
    *,
    progress: float | None = None,
    error: str | None = None,
    only_from: Sequence[DocumentStatus] = ACTIVE_STATUSES,
) -> bool:
    """Move a document to `status` if it is in one of `only_from`; whether it moved.

    A write first, no read: two writers (a job and a cancel) never act on a stale read."""
    values: dict[str, object] = {"status": status, "error": error}
    if progress is not None:
        values["progress"] = progress
    result = await session.execute(
        update(Document)
        .where(Document.id == document_id, Document.status.in_(only_from))
        .values(**values)
    )
    await session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


async def set_progress(session: AsyncSession, document_id: int, progress: float) -> None:
    """Progress of a running job (ignored once the document left PROCESSING)."""
    await session.execute(
        update(Document)
        .where(Document.id == document_id, Document.status == DocumentStatus.PROCESSING)
        .values(progress=progress)
    )
    await session.commit()


class NewChunk(NamedTuple):
    """A prepared chunk on its way into the store (a tuple: cheap to pickle between processes)."""

    ordinal: int
    text: str
    page: int | None
    heading: str | None
    tokens: str  # space-separated BM25 tokens


async def add_chunks(
    session: AsyncSession,
    document_id: int,
    kb_id: int,
    chunks: Sequence[NewChunk],
    embeddings: np.ndarray,
    progress: float,
) -> bool:
    """Store one batch of a PROCESSING document's chunks and its progress, in one short
    transaction; False (nothing stored) once the document left PROCESSING (cancelled, deleted).
    The chunks stay out of search until `finish_document`."""
    moved = await session.execute(
        update(Document)
        .where(Document.id == document_id, Document.status == DocumentStatus.PROCESSING)
        .values(progress=progress)
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        return False
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    rows = [
        {
            "document_id": document_id,
            "kb_id": kb_id,
            "ordinal": chunk.ordinal,
            "text": chunk.text,
            "page": chunk.page,
            "heading": chunk.heading,
            "tokens": chunk.tokens,
            "embedding": vectors[i].tobytes(),
        }
        for i, chunk in enumerate(chunks)
    ]
    if rows:  # one executemany, not an ORM object per chunk
        await session.execute(insert(ChunkRow), rows)
    await session.commit()
    return True


async def finish_document(session: AsyncSession, document_id: int) -> bool:
    """Mark a PROCESSING document DONE with the chunks stored so far, which makes them
    searchable; False if it was cancelled or deleted meanwhile."""
    num_chunks = await session.scalar(
        select(func.count()).select_from(ChunkRow).where(ChunkRow.document_id == document_id)
    )
    moved = await session.execute(
        update(Document)
        .where(Document.id == document_id, Document.status == DocumentStatus.PROCESSING)
        .values(status=DocumentStatus.DONE, progress=1.0, error=None, num_chunks=num_chunks)
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        return False
    kb_id = await session.scalar(select(Document.kb_id).where(Document.id == document_id))
    await _bump_version(session, kb_id)
    await session.commit()
    return True


async def drop_unfinished_chunks(session: AsyncSession, document_id: int) -> None:
    """Delete the chunks a job stored for a document that did not become DONE (a cancel, a
    failure, a restart); a DONE document's chunks are left alone."""
    status = await session.scalar(select(Document.status).where(Document.id == document_id))
    if status is not DocumentStatus.DONE:
        await session.execute(delete(ChunkRow).where(ChunkRow.document_id == document_id))
        await session.commit()


async def _bump_version(session: AsyncSession, kb_id: int | None) -> None:
    await session.execute(
        update(KnowledgeBase)
        .where(KnowledgeBase.id == kb_id)
        .values(index_version=KnowledgeBase.index_version + 1)
    )
