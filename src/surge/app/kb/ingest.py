"""Background ingestion: upload → (dedup) → queue → parse, split, tokenize → embed → store.

At most `max_concurrent_jobs` documents are processed at once (a semaphore); the rest wait as
QUEUED. The CPU-bound step (parse, split, tokenize) runs in the ingestor's own low-priority
worker processes, off the event loop and off its GIL, so a large upload can't delay anyone's
chat or retrieval (a thread pool can be passed instead: tests). The worker reads the stored file
itself and writes the prepared chunks to a spool file in batches of `embed_batch_size`; the job
reads one batch at a time, embeds it, and stores it with the progress in one short transaction.
So the server process never unpickles or holds a whole large document (a 30 MB PDF's 66k chunks
took a second of GIL to unpickle at once), and no transaction holds the database for long. The
stored chunks are invisible to search until the last batch is in and the document turns DONE;
a job that ends any other way deletes them.

Cancel marks the document CANCELLED first, then cancels its job: whatever the job was doing
(waiting for its turn, embedding) stops, and its final write, which only moves a PROCESSING
document to DONE, finds nothing to do. A parse already running in a worker can't be
interrupted: it finishes, holding its worker, and its result is dropped. A job stopped by
`close` (shutdown) leaves its document QUEUED for `resume` at the next start."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import multiprocessing
import os
import pickle
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from surge.app.kb import store
from surge.app.kb.blobs import BlobStore
from surge.app.kb.bm25 import tokenize
from surge.app.kb.index import EmbedFn, indexed_text
from surge.app.kb.parse import FileTooLarge, ParseLimits, detect_file_type, parse_document
from surge.app.kb.split import Chunk, SplitConfig, split_sections
from surge.app.kb.store import DocumentStatus, NewChunk

logger = logging.getLogger(__name__)

PREPARED_PROGRESS = 0.1  # parsed, split and tokenized; embedding takes the rest
MAX_FILE_NAME = 255
MAX_ERROR_CHARS = 500
PARSE_NICE = 10  # as the embedding worker
SPOOL_PREFIX = ".chunks-"  # prepared chunks on their way from a parse worker to the store
STALE_SPOOL_S = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """How much ingestion may do at once."""

    max_concurrent_jobs: int = 2
    embed_batch_size: int = 64
    limits: ParseLimits = field(default_factory=ParseLimits)

    def __post_init__(self) -> None:
        if self.max_concurrent_jobs < 1 or self.embed_batch_size < 1:
            raise ValueError("max_concurrent_jobs and embed_batch_size must be at least 1")


@dataclass(frozen=True, slots=True)
class Upload:
    """What `Ingestor.add` did with a file."""

    document_id: int
    duplicate: bool  # the knowledge base already held these bytes: no new document


def safe_file_name(name: str) -> str:
    """The last path component, without control characters, at most 255 characters."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", name.replace("\\", "/")).rsplit("/", 1)[-1].strip()
    return (name if name not in ("", ".", "..") else "unnamed")[:MAX_FILE_NAME]


def _lower_priority() -> None:
    """A parse worker yields the CPUs to the chat engine and the API: it runs only on a CPU
    that nothing else wants (SCHED_IDLE), or, where Linux refuses that, niced."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or a policy that forbids it
        os.nice(PARSE_NICE)


def _prepare(
    file_name: str, data: bytes, config: SplitConfig, limits: ParseLimits
) -> tuple[list[Chunk], list[list[str]]]:
    """The CPU-bound part of a job: the chunks of a file and their BM25 tokens."""
    chunks = split_sections(parse_document(file_name, data, limits=limits), file_name, config)
    return chunks, [tokenize(indexed_text(chunk.heading, chunk.text)) for chunk in chunks]


def _prepare_to_spool(
    source: Path,
    file_name: str,
    config: SplitConfig,
    limits: ParseLimits,
    spool: Path,
    batch_size: int,
) -> int:
    """`_prepare` the stored file at `source` into `spool`, as pickled lists of `NewChunk` of
    `batch_size` each (what `_read_spool` yields); runs in a worker process. How many chunks."""
    chunks, tokens = _prepare(file_name, source.read_bytes(), config, limits)
    with spool.open("wb") as out:
        for start in range(0, len(chunks), batch_size):
            batch = [
                NewChunk(c.ordinal, c.text, c.page, c.heading, " ".join(t))
                for c, t in zip(
                    chunks[start : start + batch_size],
                    tokens[start : start + batch_size],
                    strict=True,
                )
            ]
            pickle.dump(batch, out, protocol=pickle.HIGHEST_PROTOCOL)
    return len(chunks)


def _read_spool(file: BinaryIO) -> Iterator[list[NewChunk]]:
    """The batches `_prepare_to_spool` wrote (a file of our own making: pickle is safe here)."""
    while True:
        try:
            yield pickle.load(file)
        except EOFError:
            return


class Ingestor:
    """Runs ingestion jobs for every knowledge base of the app; one per app process."""

    def __init__(
        self,
        sessions: async_sessionmaker,  # type: ignore[type-arg]
        blobs: BlobStore,
        embed: EmbedFn,
        config: IngestConfig | None = None,
        executor: concurrent.futures.Executor | None = None,
        *,
        embed_for: Callable[[str], EmbedFn] | None = None,
    ) -> None:
        """`embed_for(kb.embedding_model)`, when given, embeds a knowledge base's documents with
        its own model; `embed` serves the rest."""
        self.config = config or IngestConfig()
        self._sessions = sessions
        self._blobs = blobs
        self._embed = embed
        self._embed_for = embed_for
        self._own_executor = executor is None
        # Worker processes, not threads: parsing a large PDF is pure Python, and in a thread it
        # holds the GIL that the event loop serving everyone's chat needs (TTFT p95 rose 6x
        # during a 30 MB PDF's parse). Niced, started on first use.
        self._executor = executor or concurrent.futures.ProcessPoolExecutor(
            self.config.max_concurrent_jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_lower_priority,
        )
        self._slots = asyncio.Semaphore(self.config.max_concurrent_jobs)
        self._tasks: dict[int, asyncio.Task[None]] = {}

    async def add(self, kb_id: int, file_name: str, data: bytes) -> Upload:
        """`add_file` of bytes in memory."""
        return await self.add_file(kb_id, file_name, io.BytesIO(data))

    async def add_file(self, kb_id: int, file_name: str, file: BinaryIO) -> Upload:
        """Store an uploaded file and queue it, unless the knowledge base has it already.

        `file` (seekable: an upload's spooled temporary file) is read in chunks, never whole.
        Raises `FileTooLarge` or `UnsupportedFileType` (for a 413 or 400) before storing."""
        limits = self.config.limits
        size = file.seek(0, os.SEEK_END)
        file.seek(0)
        if size > limits.max_bytes:
            raise FileTooLarge(f"{size} bytes is over the limit of {limits.max_bytes}")
        file_name = safe_file_name(file_name)
        await asyncio.to_thread(detect_file_type, file_name, file)
        sha256 = await asyncio.to_thread(self._blobs.put_file, file)
        async with self._sessions() as session:
            try:
                document, created = await store.add_document(
                    session, kb_id=kb_id, file_name=file_name, sha256=sha256, size_bytes=size
                )
            except Exception:  # e.g. no such knowledge base: leave no orphan file behind
                if not await store.is_file_used(session, sha256):
                    await asyncio.to_thread(self._blobs.delete, sha256)
                raise
        if not created and document.status in (DocumentStatus.FAILED, DocumentStatus.CANCELLED):
            await self.reindex(document.id)  # uploading it again is asking to retry
        elif created:
            self._submit(document.id)
        return Upload(document.id, duplicate=not created)

    async def reindex(self, document_id: int) -> bool:
        """Drop a document's chunks and process it again; False while it is in a job."""
        async with self._sessions() as session:
            if not await store.requeue_document(session, document_id):
                return False
        self._submit(document_id)
        return True

    async def cancel(self, document_id: int) -> bool:
        """Stop a queued or running document's job; False if it had none."""
        async with self._sessions() as session:
            moved = await store.set_status(session, document_id, DocumentStatus.CANCELLED)
        task = self._tasks.get(document_id)
        if task is not None:
            task.cancel()
        return moved

    async def delete_document(self, document_id: int) -> bool:
        """Stop its job, delete it and its chunks, and its file if no other document has it."""
        await self.cancel(document_id)
        await self._wait_quietly(document_id)
        async with self._sessions() as session:
            sha256 = await store.delete_document(session, document_id)
            if sha256 is None:
                return False
            if not await store.is_file_used(session, sha256):
                await asyncio.to_thread(self._blobs.delete, sha256)
        return True

    async def delete_kb(self, kb_id: int) -> None:
        """Stop its jobs, then delete the knowledge base and its files no other one holds."""
        async with self._sessions() as session:
            documents = await store.list_documents(session, kb_id)
        for document in documents:
            if document.status.is_active:
                await self.cancel(document.id)
                await self._wait_quietly(document.id)
        async with self._sessions() as session:
            for sha256 in set(await store.delete_kb(session, kb_id)):
                if not await store.is_file_used(session, sha256):
                    await asyncio.to_thread(self._blobs.delete, sha256)

    async def resume(self) -> int:
        """Queue again the documents a previous run left QUEUED or PROCESSING; how many. Spool
        files a killed run left behind are deleted once a day old (several app processes may
        share the data directory, and a live job's spool is younger than that)."""
        await asyncio.to_thread(_delete_stale_spools, self._blobs.root)
        async with self._sessions() as session:
            ids = list(
                await session.scalars(
                    select(store.Document.id).where(
                        store.Document.status.in_(store.ACTIVE_STATUSES)
                    )
                )
            )
            for document_id in ids:
                await store.set_status(session, document_id, DocumentStatus.QUEUED, progress=0.0)
        for document_id in ids:
            self._submit(document_id)
        return len(ids)

    async def wait(self, document_id: int) -> None:
        """Until the document's current job (if any) has ended, however it ended."""
        await self._wait_quietly(document_id)

    async def close(self) -> None:
        """Stop every job (their documents stay QUEUED for `resume`)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_executor:
            _stop_workers(self._executor)

    def _submit(self, document_id: int) -> None:
        # A job still ending (a cancel's last write) runs out first; a job that finds its
        # document no longer QUEUED does nothing, so a second submit is harmless.
        previous = self._tasks.get(document_id)
        self._tasks[document_id] = asyncio.create_task(
            self._run(document_id, previous), name=f"kb-ingest-{document_id}"
        )

    async def _wait_quietly(self, document_id: int) -> None:
        task = self._tasks.get(document_id)
        if task is not None:
            await asyncio.wait([task])  # unlike gather, a cancelled waiter leaves the job be

    async def _run(self, document_id: int, previous: asyncio.Task[None] | None) -> None:
        """One job, start to end; every way out leaves the document in a truthful state."""
        try:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])  # (wait, unlike gather, never cancels it)
            async with self._slots:
                await self._process(document_id)
        except asyncio.CancelledError:
            # A user's cancel has already written CANCELLED; otherwise (shutdown) go back to
            # QUEUED. Shielded: the write must happen although this task is being cancelled.
            await asyncio.shield(self._abandon(document_id, DocumentStatus.QUEUED, progress=0.0))
            raise
        except Exception as exc:
            logger.warning("ingesting document %d failed: %s", document_id, exc)
            await self._abandon(document_id, DocumentStatus.FAILED, error=_describe(exc))
        finally:
            if self._tasks.get(document_id) is asyncio.current_task():
                del self._tasks[document_id]

    async def _process(self, document_id: int) -> None:
        async with self._sessions() as session:
            document = await store.get_document(session, document_id)
            kb = await store.get_kb(session, document.kb_id) if document else None
            if document is None or kb is None:
                return  # deleted while it waited
            if not await store.set_status(
                session,
                document_id,
                DocumentStatus.PROCESSING,
                progress=0.0,
                only_from=(DocumentStatus.QUEUED,),
            ):
                return  # cancelled while it waited
            await store.drop_unfinished_chunks(session, document_id)  # a crashed run's
        fd, name = tempfile.mkstemp(dir=self._blobs.root, prefix=SPOOL_PREFIX)
        os.close(fd)
        spool = Path(name)
        try:
            num_chunks = await asyncio.get_running_loop().run_in_executor(
                self._executor,
                _prepare_to_spool,
                self._blobs.path(document.content_sha256),
                document.file_name,
                SplitConfig(kb.chunk_size, kb.overlap),
                self.config.limits,
                spool,
                self.config.embed_batch_size,
            )
            if not num_chunks:
                raise ValueError("no text found in the file (a scanned PDF holds only images)")
            await self._progress(document_id, PREPARED_PROGRESS)
            embed = self._embed_for(kb.embedding_model) if self._embed_for else self._embed
            if not await self._embed_and_store(document_id, kb.id, spool, num_chunks, embed):
                await self._abandon(document_id, None)  # cancelled or deleted meanwhile
                return
        finally:
            spool.unlink(missing_ok=True)
        # Shielded, session and all: the final write completes even if a cancel comes now.
        await asyncio.shield(self._finish(document_id))

    async def _finish(self, document_id: int) -> None:
        async with self._sessions() as session:
            await store.finish_document(session, document_id)

    async def _embed_and_store(
        self, document_id: int, kb_id: int, spool: Path, num_chunks: int, embed: EmbedFn
    ) -> bool:
        """Embed and store the spooled batches one at a time, with progress; False if the
        document left PROCESSING meanwhile."""
        done = 0
        with spool.open("rb") as file:
            batches = _read_spool(file)
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                texts = [chunk.text for chunk in batch]
                vectors = np.asarray(await embed(texts), dtype=np.float32)
                if vectors.ndim != 2 or len(vectors) != len(texts):
                    raise ValueError(f"the embedding service returned shape {vectors.shape}")
                vectors = vectors / np.maximum(
                    np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12
                )
                done += len(batch)
                progress = PREPARED_PROGRESS + (0.99 - PREPARED_PROGRESS) * done / num_chunks
                async with self._sessions() as session:
                    if not await store.add_chunks(
                        session, document_id, kb_id, batch, vectors, round(progress, 4)
                    ):
                        return False
        return True

    async def _progress(self, document_id: int, progress: float) -> None:
        async with self._sessions() as session:
            await store.set_progress(session, document_id, round(progress, 4))

    async def _abandon(
        self, document_id: int, status: DocumentStatus | None, **values: object
    ) -> None:
        """A job that will not finish: the document moves to `status` (unless a cancel or a
        delete got there first), and the chunks the job stored go."""
        async with self._sessions() as session:
            if status is not None:
                await store.set_status(session, document_id, status, **values)  # type: ignore[arg-type]
            await store.drop_unfinished_chunks(session, document_id)


def _delete_stale_spools(root: Path) -> None:
    cutoff = time.time() - STALE_SPOOL_S
    for spool in root.glob(f"{SPOOL_PREFIX}*"):
        try:
            if spool.stat().st_mtime < cutoff:
                spool.unlink()
        except FileNotFoundError:
            pass


def _stop_workers(executor: concurrent.futures.Executor) -> None:
    """Shut the pool down without waiting for a parse in progress: its worker is terminated
    (a 30 MB PDF parses for minutes, and the interpreter's exit would wait for it)."""
    workers = dict(getattr(executor, "_processes", None) or {})  # ProcessPoolExecutor's own
    executor.shutdown(wait=False, cancel_futures=True)
    for process in workers.values():
        if process.is_alive():
            process.terminate()


def _describe(exc: Exception) -> str:
    """A failure as the user sees it on the document (no server paths)."""
    if isinstance(exc, OSError):
        return "the stored file could not be read: upload it again"
    text = str(exc) or type(exc).__name__
    return text[:MAX_ERROR_CHARS]
