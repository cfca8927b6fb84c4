"""The knowledge bases' runtime in the app: files, ingestion jobs, index cache and embeddings,
built once in the lifespan; and the one access check every knowledge-base route goes through.

Embeddings come from the model service's /v1/embeddings, each knowledge base with the model it
was made with, over a client of its own (an ingestion's bursts never queue behind chats). A
knowledge base whose `embedding_model` is "" searches by keywords alone: what the app offers
when the service serves no embedding model."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Annotated

import httpx
import numpy as np
from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from surge.app.auth import CurrentUser
from surge.app.config import AppConfig
from surge.app.deps import Db, State
from surge.app.errors import AppError, not_found
from surge.app.kb import store
from surge.app.kb.blobs import BlobStore
from surge.app.kb.cache import IndexCache
from surge.app.kb.embed import EmbeddingError, service_embedder
from surge.app.kb.followup import SearchQuery
from surge.app.kb.index import EmbedFn, Hit, SearchMode, search
from surge.app.kb.ingest import IngestConfig, Ingestor
from surge.app.kb.parse import ParseLimits
from surge.app.kb.rerank import POOL_FACTOR, RerankError, reorder, service_reranker
from surge.app.kb.store import KnowledgeBase
from surge.app.models import User
from surge.app.upstream import (
    MAX_ERROR_BODY,
    Upstream,
    UpstreamError,
    error_from_exception,
    error_from_status,
    make_client,
)

MAX_CONCURRENT_JOBS = 2  # documents processed at once, across every user
RERANK_LOOKUP_S = 60.0  # how long the service's rerank model (or its absence) is remembered

logger = logging.getLogger(__name__)


async def _keywords_only(texts: list[str]) -> np.ndarray:
    """The "embedding" of a keyword-only knowledge base: no dimensions."""
    return np.zeros((len(texts), 0), dtype=np.float32)


@dataclass(slots=True)
class Embedders:
    """Each embedding model's function over one client (a keyword-only one for "")."""

    client: httpx.AsyncClient  # its base URL is the service's /v1/
    _by_model: dict[str, EmbedFn] = field(default_factory=dict)

    def __call__(self, model: str) -> EmbedFn:
        if not model:
            return _keywords_only
        if model not in self._by_model:
            self._by_model[model] = service_embedder(self.client, model)
        return self._by_model[model]


@dataclass(slots=True)
class KnowledgeService:
    """Files on disk, the ingestion jobs, each knowledge base's index, and the embedders."""

    blobs: BlobStore
    ingestor: Ingestor
    cache: IndexCache
    upstream: Upstream
    embedders: Embedders
    files_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # makes file-chat stores
    # the service's rerank model (None: it serves none), and when that was last looked up
    _reranker: tuple[float, str | None] | None = None

    @classmethod
    async def start(
        cls,
        config: AppConfig,
        sessions: async_sessionmaker[AsyncSession],
        upstream: Upstream,
    ) -> KnowledgeService:
        """Build it and queue again the documents a previous run left unfinished."""
        client = make_client(config)
        client.base_url = httpx.URL(config.api_base.rstrip("/") + "/")
        embedders = Embedders(client)
        blobs = BlobStore(config.data_dir / "kb-files")
        ingest_config = IngestConfig(
            max_concurrent_jobs=MAX_CONCURRENT_JOBS,
            limits=ParseLimits(max_bytes=config.max_upload_bytes),
        )
        ingestor = Ingestor(sessions, blobs, _keywords_only, ingest_config, embed_for=embedders)
        await ingestor.resume()
        return cls(blobs, ingestor, IndexCache(sessions), upstream, embedders)

    async def close(self) -> None:
        await self.ingestor.close()
        await self.embedders.client.aclose()

    async def embedding_models(self) -> list[str]:
        """The ids of the service's embedding models (kind "embedding" in /v1/models)."""
        try:
            resp = await self.upstream.client.get(f"{self.upstream.base}/models")
        except httpx.HTTPError as e:
            raise error_from_exception(e, self.upstream.base) from e
        if resp.status_code >= 400:
            raise error_from_status(
                resp.status_code, resp.content[:MAX_ERROR_BODY], resp.headers.get("retry-after")
            )
        try:
            return [m["id"] for m in resp.json()["data"] if m.get("kind") == "embedding"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UpstreamError(
                502, "The model service listed its models badly.", retryable=True
            ) from e

    async def rerank_model(self) -> str | None:
        """The service's first rerank model (kind "rerank" in /v1/models), looked up at most
        once a minute; None when it serves none or can't be asked."""
        now = time.monotonic()
        if self._reranker is not None and now - self._reranker[0] < RERANK_LOOKUP_S:
            return self._reranker[1]
        try:
            resp = await self.upstream.client.get(f"{self.upstream.base}/models")
            models = resp.json()["data"] if resp.status_code < 400 else []
            found = next((m["id"] for m in models if m.get("kind") == "rerank"), None)
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            found = None
        self._reranker = (now, found)
        return found

    async def search(
        self, kb: KnowledgeBase, query: SearchQuery, *, top_k: int, mode: SearchMode
    ) -> list[Hit]:
        """The best passages of `kb` for `query` (a follow-up's context included), reranked by
        the service's rerank model when it serves one (hybrid mode; the reranker gets the
        context and the question as one text); AppError 502 when embedding the query failed."""
        model = await self.rerank_model() if mode is SearchMode.HYBRID else None
        if model is None:
            return await self._search(kb, query, top_k=top_k, mode=mode)
        pool = await self._search(kb, query, top_k=top_k * POOL_FACTOR, mode=mode)
        rerank = service_reranker(self.upstream.client, self.upstream.base, model)
        try:
            scores = await rerank(query.full_text, [hit.passage.text for hit in pool])
        except (RerankError, httpx.HTTPError) as e:  # the hybrid order still stands
            logger.warning("reranking with %s failed, keeping the hybrid order: %s", model, e)
            return pool[:top_k]
        return reorder(pool, scores, top_k)

    async def _search(
        self, kb: KnowledgeBase, query: SearchQuery, *, top_k: int, mode: SearchMode
    ) -> list[Hit]:
        try:
            index = await self.cache.get(kb.id)
        except LookupError as e:  # deleted meanwhile
            raise not_found("knowledge base") from e
        context, weight = query.context, query.context_weight
        if not kb.embedding_model:
            if mode is SearchMode.VECTOR:
                raise AppError(400, "keywords_only", "this knowledge base has no embedding model")
            return await asyncio.to_thread(
                index.search,
                query.text,
                None,
                top_k=top_k,
                mode=mode,
                context=context,
                context_weight=weight,
            )
        embed = self.embedders(kb.embedding_model)
        try:
            return await search(
                index,
                query.text,
                embed,
                top_k=top_k,
                mode=mode,
                context=context,
                context_weight=weight,
            )
        except (EmbeddingError, httpx.HTTPError, KeyError, TypeError, ValueError) as e:
            raise AppError(502, "embedding_failed", f"embedding the query failed: {e}") from e


def get_kb_service(state: State) -> KnowledgeService:
    """The knowledge-base service of the app (built in the lifespan)."""
    if state.kb is None:
        raise AppError(503, "kb_unavailable", "knowledge bases are not available")
    return state.kb


KB = Annotated[KnowledgeService, Depends(get_kb_service)]


class Access(enum.Enum):
    READ = "read"  # see, search, ask, list documents
    WRITE = "write"  # also upload, cancel, re-index, delete documents
    MANAGE = "manage"  # also rename, change visibility, delete it


def can_manage(kb: KnowledgeBase, user: User) -> bool:
    return user.is_admin or kb.owner_id == user.id


async def load_kb(db: AsyncSession, kb_id: int, user: User, access: Access) -> KnowledgeBase:
    """The knowledge base if `user` may `access` it. One it may not even read is a 404 whether
    or not it exists; one it may read but not change is a 403."""
    kb = await store.get_kb(db, kb_id)
    if kb is None or not store.can_read(kb, user.id, user.is_admin):
        raise not_found("knowledge base")
    if access is Access.WRITE and not store.can_write(kb, user.id, user.is_admin):
        raise AppError(403, "read_only", "this knowledge base is shared read-only")
    if access is Access.MANAGE and not can_manage(kb, user):
        raise AppError(403, "not_owner", "only the owner can change this knowledge base")
    return kb


async def readable_kb(kb_id: int, user: CurrentUser, db: Db) -> KnowledgeBase:
    return await load_kb(db, kb_id, user, Access.READ)


async def writable_kb(kb_id: int, user: CurrentUser, db: Db) -> KnowledgeBase:
    return await load_kb(db, kb_id, user, Access.WRITE)


async def managed_kb(kb_id: int, user: CurrentUser, db: Db) -> KnowledgeBase:
    return await load_kb(db, kb_id, user, Access.MANAGE)


ReadableKB = Annotated[KnowledgeBase, Depends(readable_kb)]
WritableKB = Annotated[KnowledgeBase, Depends(writable_kb)]
ManagedKB = Annotated[KnowledgeBase, Depends(managed_kb)]
