"""Knowledge-base routes: create, list, read, change and delete knowledge bases; search one (the
retrieval test page); read one passage. Documents are in `kb_documents`, answers in `kb_chat`.

Who may do what is decided in one place, `kb_service.load_kb`: the owner everything; on a
shared_read knowledge base others read, search and ask; on a shared_write one they also upload
and delete documents; an admin everything. Another user's private knowledge base is a 404."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, Response
from sqlalchemy import func, select

from surge.app.auth import CurrentUser
from surge.app.deps import Db
from surge.app.errors import AppError, not_found
from surge.app.kb import store
from surge.app.kb.cite import Relevance, select_relevant
from surge.app.kb.followup import SearchQuery
from surge.app.kb.store import ChunkRow, Document, KnowledgeBase
from surge.app.kb_links import hidden_kb_ids
from surge.app.kb_schemas import (
    EmbeddingModelsOut,
    HitOut,
    KBIn,
    KBOut,
    KBPatch,
    PassageOut,
    SearchIn,
    SearchOut,
)
from surge.app.kb_service import KB, KnowledgeService, ManagedKB, ReadableKB, can_manage
from surge.app.models import User
from surge.app.upstream import UpstreamError

router = APIRouter(prefix="/api", tags=["knowledge bases"])


async def kb_outs(db: Db, kbs: Sequence[KnowledgeBase], user: User) -> list[KBOut]:
    """The wire form of knowledge bases, with owner names and document counts (two queries)."""
    ids = [kb.id for kb in kbs]
    counts = dict(
        (
            await db.execute(
                select(Document.kb_id, func.count())
                .where(Document.kb_id.in_(ids))
                .group_by(Document.kb_id)
            )
        ).all()
    )
    owner_ids = {kb.owner_id for kb in kbs}
    names = dict(
        (await db.execute(select(User.id, User.username).where(User.id.in_(owner_ids)))).all()
    )
    return [
        KBOut(
            id=kb.id,
            name=kb.name,
            description=kb.description,
            visibility=kb.visibility,
            owner_id=kb.owner_id,
            owner=names.get(kb.owner_id),
            chunk_size=kb.chunk_size,
            overlap=kb.overlap,
            embedding_model=kb.embedding_model,
            created_at=kb.created_at,
            num_documents=counts.get(kb.id, 0),
            can_write=store.can_write(kb, user.id, user.is_admin),
            can_manage=can_manage(kb, user),
        )
        for kb in kbs
    ]


async def embedding_model_for(service: KnowledgeService, requested: str | None) -> str:
    """The model a new knowledge base embeds with: the one asked for (which the service must
    serve), else the service's first embedding model, else "" (keyword search only)."""
    if requested == "":
        return ""
    try:
        models = await service.embedding_models()
    except UpstreamError as e:
        raise AppError(e.status, "upstream", e.message) from e
    if requested is None:
        return models[0] if models else ""
    if requested not in models:
        offered = ", ".join(models) or "none"
        raise AppError(
            400,
            "unknown_model",
            f"{requested!r} is not an embedding model of the service (it offers: {offered})",
        )
    return requested


@router.get("/embedding-models", operation_id="list_embedding_models")
async def list_embedding_models(_user: CurrentUser, service: KB) -> EmbeddingModelsOut:
    """GET /api/embedding-models → {"models": [...]}: the service's embedding models (the
    first is the default of a new knowledge base)."""
    try:
        return EmbeddingModelsOut(models=await service.embedding_models())
    except UpstreamError as e:
        raise AppError(e.status, "upstream", e.message) from e


@router.get("/kbs", operation_id="list_kbs")
async def list_kbs(user: CurrentUser, db: Db) -> list[KBOut]:
    """GET /api/kbs → [KB]: the knowledge bases the user may read (their own and shared ones;
    every one for an admin), oldest first. Conversations' own file stores are left out."""
    kbs = await store.list_kbs(db, user_id=user.id, is_admin=user.is_admin)
    hidden = await hidden_kb_ids(db, [kb.id for kb in kbs])
    return await kb_outs(db, [kb for kb in kbs if kb.id not in hidden], user)


@router.post("/kbs", status_code=201, operation_id="create_kb")
async def create_kb(body: KBIn, user: CurrentUser, db: Db, service: KB) -> KBOut:
    """POST /api/kbs {name, description?, visibility?, chunk_size?, overlap?, embedding_model?}
    → 201 KB, owned by the user. Visibility: private (default), shared_read, shared_write."""
    model = await embedding_model_for(service, body.embedding_model)
    kb = await store.create_kb(
        db,
        owner_id=user.id,
        name=body.name,
        description=body.description,
        visibility=body.visibility,
        chunk_size=body.chunk_size,
        overlap=body.overlap,
        embedding_model=model,
    )
    return (await kb_outs(db, [kb], user))[0]


@router.get("/kbs/{kb_id}", operation_id="get_kb")
async def get_kb(kb: ReadableKB, user: CurrentUser, db: Db) -> KBOut:
    """GET /api/kbs/{kb_id} → KB (404 if the user may not read it)."""
    return (await kb_outs(db, [kb], user))[0]


@router.patch("/kbs/{kb_id}", operation_id="update_kb")
async def update_kb(body: KBPatch, kb: ManagedKB, user: CurrentUser, db: Db) -> KBOut:
    """PATCH /api/kbs/{kb_id} {name?, description?, visibility?} → KB (owner or admin)."""
    for name in body.model_fields_set:
        value = getattr(body, name)
        if value is None and name == "description":
            value = ""
        if value is not None:
            setattr(kb, name, value)
    await db.commit()
    return (await kb_outs(db, [kb], user))[0]


@router.delete("/kbs/{kb_id}", status_code=204, operation_id="delete_kb")
async def delete_kb(kb: ManagedKB, db: Db, service: KB) -> Response:
    """DELETE /api/kbs/{kb_id} → 204: its jobs stopped, documents, chunks and files deleted
    (owner or admin)."""
    await db.commit()  # this session's read ends; the ingestor deletes with its own
    await service.ingestor.delete_kb(kb.id)
    service.cache.invalidate(kb.id)
    return Response(status_code=204)


@router.post("/kbs/{kb_id}/search", operation_id="search_kb")
async def search_kb(body: SearchIn, kb: ReadableKB, db: Db, service: KB) -> SearchOut:
    """POST /api/kbs/{kb_id}/search {query, top_k=5, mode=hybrid|bm25|vector} → the top_k
    passages with every score (hybrid, bm25, vector, coverage, ranks) and whether each clears
    the relevance thresholds an answer uses."""
    await db.commit()  # hold no database connection while the query is embedded
    query = SearchQuery(body.query)
    hits = await service.search(kb, query, top_k=body.top_k, mode=body.mode)
    relevance = Relevance()
    relevant = {hit.passage.chunk_id for hit in select_relevant(hits, relevance)}
    return SearchOut(
        query=body.query,
        mode=body.mode,
        embedding_model=kb.embedding_model,
        min_vector=relevance.min_vector,
        min_coverage=relevance.min_coverage,
        hits=[
            HitOut.of(rank, hit, hit.passage.chunk_id in relevant)
            for rank, hit in enumerate(hits, 1)
        ],
    )


@router.get("/kbs/{kb_id}/passages/{chunk_id}", operation_id="get_passage")
async def get_passage(chunk_id: int, kb: ReadableKB, db: Db) -> PassageOut:
    """GET /api/kbs/{kb_id}/passages/{chunk_id} → the passage (text, file, page, heading)."""
    row = (
        await db.execute(
            select(ChunkRow, Document.file_name)
            .join(Document, Document.id == ChunkRow.document_id)
            .where(ChunkRow.id == chunk_id, ChunkRow.kb_id == kb.id)
        )
    ).first()
    if row is None:
        raise not_found("passage")
    chunk, file_name = row
    return PassageOut(
        chunk_id=chunk.id,
        document_id=chunk.document_id,
        file_name=file_name,
        page=chunk.page,
        heading=chunk.heading,
        text=chunk.text,
    )
