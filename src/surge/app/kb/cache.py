"""Each knowledge base's search index in memory, rebuilt when the knowledge base changed.

Before each use the cache reads the knowledge base's `index_version` (one small query); the
store bumps it in the same transaction as every change to what the knowledge base retrieves,
so a stale index is never served, even when several app processes share one database."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from surge.app.kb.index import KnowledgeIndex, Passage
from surge.app.kb.store import ChunkRow, Document, DocumentStatus, KnowledgeBase

LOAD_PARTITION_ROWS = 1024  # rows per step of a load; the event loop runs others between


class IndexCache:
    """Each knowledge base's `KnowledgeIndex`, built on first use and rebuilt after a change.

    Holds the `max_entries` most recently used; a build runs in a worker thread, and
    concurrent requests for the same knowledge base share one build."""

    def __init__(self, sessions: async_sessionmaker, max_entries: int = 32) -> None:  # type: ignore[type-arg]
        self._sessions = sessions
        self._max_entries = max_entries
        self._entries: OrderedDict[int, tuple[int, KnowledgeIndex]] = OrderedDict()
        self._locks: dict[int, asyncio.Lock] = {}

    async def get(self, kb_id: int) -> KnowledgeIndex:
        """The current index of a knowledge base; LookupError if there is no such one."""
        version = await self._version(kb_id)
        entry = self._entries.get(kb_id)
        if entry is not None and entry[0] == version:
            self._entries.move_to_end(kb_id)
            return entry[1]
        async with self._locks.setdefault(kb_id, asyncio.Lock()):
            entry = self._entries.get(kb_id)
            if entry is not None and entry[0] >= version:  # built while we waited
                return entry[1]
            version, rows = await self._load(kb_id)
            index = await asyncio.to_thread(_build_index, rows)
            self._entries[kb_id] = (version, index)
            self._entries.move_to_end(kb_id)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
            return index

    def invalidate(self, kb_id: int) -> None:
        """Forget a knowledge base's index (the version check makes this optional)."""
        self._entries.pop(kb_id, None)

    async def _version(self, kb_id: int) -> int:
        async with self._sessions() as session:
            version = await session.scalar(
                select(KnowledgeBase.index_version).where(KnowledgeBase.id == kb_id)
            )
        if version is None:
            raise LookupError(f"no knowledge base {kb_id}")
        return version

    async def _load(self, kb_id: int) -> tuple[int, list[tuple]]:  # type: ignore[type-arg]
        """The version and the DONE chunks, read in one transaction (a consistent snapshot)."""
        async with self._sessions() as session, session.begin():
            version = await session.scalar(
                select(KnowledgeBase.index_version).where(KnowledgeBase.id == kb_id)
            )
            if version is None:
                raise LookupError(f"no knowledge base {kb_id}")
            # Streamed in partitions: materializing a large knowledge base's rows (66k chunks
            # for a 30 MB PDF) in one call would hold the event loop for most of a second.
            result = await session.stream(
                select(
                    ChunkRow.id,
                    ChunkRow.document_id,
                    Document.file_name,
                    ChunkRow.page,
                    ChunkRow.heading,
                    ChunkRow.text,
                    ChunkRow.tokens,
                    ChunkRow.embedding,
                )
                .join(Document, Document.id == ChunkRow.document_id)
                .where(ChunkRow.kb_id == kb_id, Document.status == DocumentStatus.DONE)
                .order_by(ChunkRow.document_id, ChunkRow.ordinal)
            )
            rows: list[tuple] = []  # type: ignore[type-arg]
            async for partition in result.partitions(LOAD_PARTITION_ROWS):
                rows.extend(tuple(row) for row in partition)
            return version, rows


def _build_index(rows: list[tuple]) -> KnowledgeIndex:  # type: ignore[type-arg]
    """CPU work (BM25 postings, the embedding matrix): run in a worker thread."""
    passages = [Passage(*row[:6]) for row in rows]
    tokens = [row[6].split() for row in rows]
    vectors = [np.frombuffer(row[7], dtype=np.float32) for row in rows]
    if len({len(v) for v in vectors}) > 1:
        raise ValueError("chunks have embeddings of different sizes: re-index the documents")
    matrix = np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    return KnowledgeIndex(passages, tokens, matrix)
