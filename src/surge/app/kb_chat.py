"""Asking knowledge bases: one question to a knowledge base (`/api/kbs/{id}/ask`), and
conversations that answer from knowledge bases or from files attached to them (file chat).

A conversation with knowledge bases or files is answered through `kb_answer` by the usual
chat routes (send, regenerate, edit-and-resend); each answer's sources are saved with it and
come back from `GET /api/conversations/{id}/knowledge`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from surge.app.answer import SSEResponse
from surge.app.auth import CurrentUser
from surge.app.conversations import OwnedConversation
from surge.app.db import LockKind, store_lock
from surge.app.deps import Db, State
from surge.app.errors import AppError, not_found
from surge.app.kb.store import Document
from surge.app.kb_answer import Event, Question, answer_events, to_sse, usage_saver
from surge.app.kb_documents import UPLOAD_BODY, ingest_upload, read_upload, watch
from surge.app.kb_links import (
    attached_kb_ids,
    ensure_files_kb,
    files_kb_id,
    set_attached,
    sources_by_message,
)
from surge.app.kb_routes import embedding_model_for
from surge.app.kb_schemas import (
    AskIn,
    AskOut,
    ConversationKnowledge,
    DocumentOut,
    KbIdsIn,
    Sources,
    UploadOut,
)
from surge.app.kb_service import KB, Access, ReadableKB, load_kb
from surge.app.models import Conversation

router = APIRouter(prefix="/api", tags=["knowledge bases"])


async def _collect(events: list[Event]) -> AskOut:
    """The events of a finished answer as one object (an error event becomes that error)."""
    last = events[-1] or {}
    if last.get("type") != "done":
        status = int(last.get("status", 500))  # type: ignore[call-overload]
        raise AppError(status, "upstream", str(last.get("message", "the answer failed")))
    text = "".join(str(e["text"]) for e in events if e and e["type"] == "delta")
    sources = Sources.model_validate(last)
    return AskOut(
        answer=text,
        model=last.get("model"),  # type: ignore[arg-type]
        usage=last.get("usage"),  # type: ignore[arg-type]
        **sources.model_dump(),
    )


@router.post(
    "/kbs/{kb_id}/ask",
    operation_id="ask_kb",
    response_model=None,
    responses={200: {"content": {"text/event-stream": {}}, "model": AskOut}},
)
async def ask_kb(
    body: AskIn, kb: ReadableKB, user: CurrentUser, db: Db, state: State, _service: KB
) -> StreamingResponse | AskOut:
    """POST /api/kbs/{kb_id}/ask {question, model?, top_k=5, temperature?, stream=true} → an
    SSE answer (events in surge.app.kb_answer; the final `done` event carries the numbered
    passages, the answer's segments with verified citations, and the cited numbers), or with
    stream false one JSON object {answer, model, usage, found, passages, segments, cited}.
    Counts toward the user's usage; rate-limited like every route."""
    await db.commit()  # hold no database connection while answering
    question = Question(
        user_id=user.id,
        kb_ids=[kb.id],
        text=body.question,
        history=[],
        model=body.model,
        temperature=body.temperature,
        top_k=body.top_k,
    )
    events = answer_events(state, question, usage_saver(state, user.id))
    if body.stream:
        return SSEResponse(to_sse({"type": "start", "user_message_id": None}, events))
    return await _collect([event async for event in events if event is not None])


async def _knowledge(db: Db, conversation: Conversation) -> ConversationKnowledge:
    files: list[DocumentOut] = []
    files_kb = await files_kb_id(db, conversation.id)
    if files_kb is not None:
        query = select(Document).where(Document.kb_id == files_kb).order_by(Document.id)
        files = [DocumentOut.model_validate(d) for d in await db.scalars(query)]
    return ConversationKnowledge(
        kb_ids=await attached_kb_ids(db, conversation.id),
        files=files,
        sources=await sources_by_message(db, conversation.id),
    )


@router.get("/conversations/{conversation_id}/knowledge", operation_id="get_knowledge")
async def get_knowledge(conversation: OwnedConversation, db: Db) -> ConversationKnowledge:
    """GET /api/conversations/{id}/knowledge → {kb_ids, files: [Document], sources:
    {message_id: {found, passages, segments, cited}}}: what the conversation answers from and
    the saved sources of its answers."""
    return await _knowledge(db, conversation)


@router.put("/conversations/{conversation_id}/kbs", operation_id="set_conversation_kbs")
async def set_conversation_kbs(
    body: KbIdsIn, conversation: OwnedConversation, user: CurrentUser, db: Db
) -> ConversationKnowledge:
    """PUT /api/conversations/{id}/kbs {kb_ids: [...]} → the conversation's knowledge. Its next
    answers retrieve from these knowledge bases (each must be readable: else 404); [] turns
    knowledge-base answers off (attached files still count)."""
    for kb_id in body.kb_ids:
        await load_kb(db, kb_id, user, Access.READ)
    await set_attached(db, conversation.id, body.kb_ids)
    return await _knowledge(db, conversation)


@router.post(
    "/conversations/{conversation_id}/files",
    status_code=201,
    operation_id="attach_files",
    openapi_extra=UPLOAD_BODY,
)
async def attach_files(
    request: Request, conversation: OwnedConversation, db: Db, service: KB
) -> UploadOut:
    """POST /api/conversations/{id}/files (multipart, one or more `files`) → 201 like a
    knowledge-base upload. File chat: the files go to the conversation's own hidden knowledge
    base (made on first use, deleted with the conversation), and its answers cite them."""
    async with read_upload(request) as files:
        # two first uploads at once (in one process or several) make one store
        async with store_lock(db, service.files_lock, LockKind.FILES_KB, conversation.id):
            kb_id = await files_kb_id(db, conversation.id)
            if kb_id is None:
                model = await embedding_model_for(service, None)
                kb_id = (await ensure_files_kb(db, conversation, model)).id
            await db.commit()  # (ends the transaction: PostgreSQL's lock goes with it)
        return await ingest_upload(db, service, kb_id, files)


@router.get("/conversations/{conversation_id}/files/progress", operation_id="watch_files")
async def watch_files(conversation: OwnedConversation, db: Db, state: State) -> SSEResponse:
    """GET /api/conversations/{id}/files/progress → SSE like a knowledge base's document
    progress, for the files attached to the conversation."""
    kb_id = await files_kb_id(db, conversation.id)
    await db.commit()
    if kb_id is None:
        raise not_found("attached files")
    return SSEResponse(watch(state, kb_id))


@router.delete(
    "/conversations/{conversation_id}/files/{document_id}",
    status_code=204,
    operation_id="detach_file",
)
async def detach_file(
    document_id: int, conversation: OwnedConversation, db: Db, service: KB
) -> Response:
    """DELETE /api/conversations/{id}/files/{document_id} → 204: the file is removed from the
    conversation (its job stopped, its passages no longer retrieved)."""
    kb_id = await files_kb_id(db, conversation.id)
    document = await db.get(Document, document_id)
    if kb_id is None or document is None or document.kb_id != kb_id:
        raise not_found("file")
    await db.commit()
    await service.ingestor.delete_document(document_id)
    return Response(status_code=204)
