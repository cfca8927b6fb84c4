"""Document routes of a knowledge base: upload (several files at once), list, read, download,
cancel, re-index, delete. Ingestion runs in the background (`kb.ingest.Ingestor`): an upload
answers as soon as its files are stored and queued, and the documents' status and progress
show how far each has got.

An upload's request body may hold at most the app's `max_upload_bytes` (all its files
together): `limits.AppBodyLimitMiddleware` refuses a larger one with 413, from its
Content-Length before anything is read, or as soon as the bytes read pass the limit; the
session is checked (the routes' dependencies) before the body is read. Memory per upload is
bounded whatever its size: each file spools to disk past SPOOL_MAX_BYTES as it streams in,
and is then type-checked, hashed and copied into the blob store in chunks. A file's name is only
ever a label: files are stored under their content hash (`kb.blobs.BlobStore`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from surge.app.answer import SSEResponse, sse
from surge.app.deps import AppState, Db, State
from surge.app.errors import AppError, not_found
from surge.app.kb.parse import FileTooLarge, ParseError, UnsupportedFileType
from surge.app.kb.store import Document
from surge.app.kb_schemas import DocumentOut, Rejected, Uploaded, UploadOut
from surge.app.kb_service import KB, KnowledgeService, ReadableKB, WritableKB

router = APIRouter(prefix="/api/kbs/{kb_id}/documents", tags=["knowledge bases"])

MAX_FILES_PER_UPLOAD = 100
SPOOL_MAX_BYTES = 64 * 1024  # of each uploaded file in memory; the rest waits on disk
PROGRESS_INTERVAL_S = 0.5  # how often a progress stream looks at the documents
FILE_FIELDS = ("files", "file")

# The OpenAPI description of an upload body (the route parses it itself, to bound it).
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["files"],
                }
            }
        },
    }
}


class _SpoolingParser(MultiPartParser):
    """Starlette's multipart parser, each file spooled to disk past SPOOL_MAX_BYTES (its
    default keeps 1 MiB of each file in memory: 100 MiB for a 100-file upload)."""

    spool_max_size = SPOOL_MAX_BYTES


@asynccontextmanager
async def read_upload(request: Request) -> AsyncIterator[list[tuple[str, BinaryIO]]]:
    """The (file name, file) of each file in a multipart upload (field `files`, or `file`),
    open until the block ends. Each file is a temporary file that holds at most
    SPOOL_MAX_BYTES in memory and the rest on disk, written as the body streams in (the body's
    size is bounded by `limits.AppBodyLimitMiddleware`); the ingestor reads it in chunks."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise AppError(415, "not_multipart", "send the files as multipart/form-data (`files`)")
    parser = _SpoolingParser(
        request.headers, request.stream(), max_files=MAX_FILES_PER_UPLOAD, max_fields=10
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise AppError(400, "bad_upload", e.message) from e
    try:
        parts = [p for name in FILE_FIELDS for p in form.getlist(name)]
        files = [p for p in parts if isinstance(p, UploadFile)]
        if not files:
            raise AppError(400, "no_files", "the upload holds no file (field `files`)")
        yield [(f.filename or "unnamed", f.file) for f in files]
    finally:
        await form.close()


def _code(error: ParseError) -> str:
    if isinstance(error, FileTooLarge):
        return "too_large"
    return "unsupported_type" if isinstance(error, UnsupportedFileType) else "unreadable"


async def ingest_upload(
    db: AsyncSession, service: KnowledgeService, kb_id: int, files: list[tuple[str, BinaryIO]]
) -> UploadOut:
    """Store and queue each file (a duplicate of one the knowledge base holds is reported, not
    added again); 400 when no file was accepted."""
    await db.commit()  # the ingestor writes with its own sessions
    accepted: list[tuple[str, int, bool]] = []
    rejected: list[Rejected] = []
    for file_name, file in files:
        try:
            upload = await service.ingestor.add_file(kb_id, file_name, file)
        except ParseError as e:
            rejected.append(Rejected(file_name=file_name, code=_code(e), message=str(e)))
            continue
        accepted.append((file_name, upload.document_id, upload.duplicate))
    if not accepted:
        reasons = "; ".join(r.message for r in rejected)
        raise AppError(400, "no_file_accepted", f"no file was accepted: {reasons}")
    ids = [document_id for _, document_id, _ in accepted]
    documents = {d.id: d for d in (await db.scalars(select(Document).where(Document.id.in_(ids))))}
    return UploadOut(
        uploaded=[
            Uploaded(
                file_name=name,
                duplicate=duplicate,
                document=DocumentOut.model_validate(documents[document_id]),
            )
            for name, document_id, duplicate in accepted
            if document_id in documents  # (deleted meanwhile)
        ],
        rejected=rejected,
    )


async def kb_document(document_id: int, kb: ReadableKB, db: Db) -> Document:
    """The path's document, which must be in the path's knowledge base (else 404)."""
    document = await db.get(Document, document_id)
    if document is None or document.kb_id != kb.id:
        raise not_found("document")
    return document


KbDocument = Annotated[Document, Depends(kb_document)]


@router.post("", status_code=201, operation_id="upload_documents", openapi_extra=UPLOAD_BODY)
async def upload_documents(request: Request, kb: WritableKB, db: Db, service: KB) -> UploadOut:
    """POST /api/kbs/{kb_id}/documents (multipart/form-data, one or more `files`) → 201
    {"uploaded": [{file_name, duplicate, document}], "rejected": [{file_name, code, message}]}.
    413 when the body is over max_upload_bytes; 403 on a knowledge base shared read-only."""
    async with read_upload(request) as files:
        return await ingest_upload(db, service, kb.id, files)


@router.get("", operation_id="list_documents")
async def list_documents(kb: ReadableKB, db: Db) -> list[DocumentOut]:
    """GET /api/kbs/{kb_id}/documents → [Document] with status (queued, processing, done,
    failed, cancelled), progress 0-1 and error, oldest first."""
    query = select(Document).where(Document.kb_id == kb.id).order_by(Document.id)
    return [DocumentOut.model_validate(d) for d in await db.scalars(query)]


async def watch(state: AppState, kb_id: int) -> AsyncIterator[str]:
    """SSE: the knowledge base's documents each time they change, until none is active."""
    last: list[dict[str, object]] | None = None
    while True:
        async with state.sessions() as db:  # a session per look: none is held in between
            query = select(Document).where(Document.kb_id == kb_id).order_by(Document.id)
            documents = [
                DocumentOut.model_validate(d).model_dump(mode="json")
                for d in await db.scalars(query)
            ]
        if documents != last:
            yield sse({"type": "documents", "documents": documents})
            last = documents
        if all(d["status"] not in ("queued", "processing") for d in documents):
            yield sse({"type": "settled"})
            return
        await asyncio.sleep(PROGRESS_INTERVAL_S)


@router.get("/progress", operation_id="watch_documents")
async def watch_documents(kb: ReadableKB, db: Db, state: State) -> SSEResponse:
    """GET /api/kbs/{kb_id}/documents/progress → SSE: {"type": "documents", "documents":
    [Document]} whenever they change (looked at twice a second), then {"type": "settled"} once
    none is queued or processing. One request instead of polling (which the rate limit counts)."""
    await db.commit()
    return SSEResponse(watch(state, kb.id))


@router.get("/{document_id}", operation_id="get_document")
async def get_document(document: KbDocument) -> DocumentOut:
    """GET /api/kbs/{kb_id}/documents/{document_id} → Document."""
    return DocumentOut.model_validate(document)


@router.get("/{document_id}/file", operation_id="download_document")
async def download_document(document: KbDocument, service: KB) -> Response:
    """GET /api/kbs/{kb_id}/documents/{document_id}/file → the uploaded bytes, as a download
    (never rendered by the browser: an uploaded HTML file can't run in the app's origin)."""
    try:
        data = await asyncio.to_thread(service.blobs.read, document.content_sha256)
    except OSError as e:
        raise not_found("file") from e
    disposition = f"attachment; filename*=UTF-8''{quote(document.file_name)}"
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": disposition, "X-Content-Type-Options": "nosniff"},
    )


async def _writable_document(document: KbDocument, _kb: WritableKB) -> Document:
    return document


WritableDocument = Annotated[Document, Depends(_writable_document)]


@router.post("/{document_id}/cancel", operation_id="cancel_document")
async def cancel_document(document: WritableDocument, db: Db, service: KB) -> DocumentOut:
    """POST /api/kbs/{kb_id}/documents/{document_id}/cancel → Document, now cancelled (409 if
    it was not queued or processing)."""
    await db.commit()
    if not await service.ingestor.cancel(document.id):
        raise AppError(409, "not_running", "the document is not being ingested")
    await db.refresh(document)
    return DocumentOut.model_validate(document)


@router.post("/{document_id}/reindex", status_code=202, operation_id="reindex_document")
async def reindex_document(document: WritableDocument, db: Db, service: KB) -> DocumentOut:
    """POST /api/kbs/{kb_id}/documents/{document_id}/reindex → 202 Document, queued again (its
    chunks dropped); 409 while it is being ingested."""
    await db.commit()
    if not await service.ingestor.reindex(document.id):
        raise AppError(409, "busy", "the document is being ingested; cancel it first")
    await db.refresh(document)
    return DocumentOut.model_validate(document)


@router.delete("/{document_id}", status_code=204, operation_id="delete_document")
async def delete_document(document: WritableDocument, db: Db, service: KB) -> Response:
    """DELETE /api/kbs/{kb_id}/documents/{document_id} → 204: its job stopped, its chunks and
    (unless another document holds the same bytes) its file deleted."""
    await db.commit()
    await service.ingestor.delete_document(document.id)
    return Response(status_code=204)
