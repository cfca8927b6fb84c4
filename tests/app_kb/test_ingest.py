"""Ingestion jobs against a real SQLite store: progress, dedup, cancel, failures, bounds,
re-index, delete, restart, and the index cache. The embedder is model-free; nothing here
depends on timing (jobs are gated by events, not sleeps)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from surge.app.kb import ingest, store
from surge.app.kb.blobs import BlobStore
from surge.app.kb.cache import IndexCache
from surge.app.kb.index import search
from surge.app.kb.ingest import IngestConfig, Ingestor
from surge.app.kb.parse import FileTooLarge, ParseLimits, UnsupportedFileType
from surge.app.kb.store import ChunkRow, Document, DocumentStatus, Visibility
from tests.app_kb.conftest import fake_embed, open_store

MANUAL = (
    "# Observatory\n\n## Faults\n\nFault E-4471 means the dome motor has stalled. Clear the ice.\n\n"
    "## Visitors\n\n" + "Public nights are on the first Saturday of each month. " * 30
).encode()
NOTES = "绿茶的水温以八十到八十五摄氏度为宜。\n\n投茶量为每一百五十毫升水放三克茶叶。".encode()

EmbedFn = Callable[[list[str]], Awaitable[np.ndarray]]


class Harness:
    """A store, a blob dir, an ingestor and one knowledge base, in a temp dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    async def start(self, embed: EmbedFn = fake_embed, **config: object) -> Harness:
        self.engine, self.sessions = await open_store(self.data_dir)
        self.blobs = BlobStore(self.data_dir / "files")
        self.ingestor = Ingestor(self.sessions, self.blobs, embed, IngestConfig(**config))  # type: ignore[arg-type]
        self.cache = IndexCache(self.sessions)
        self.kb_id = await self.new_kb()
        return self

    async def new_kb(self, owner_id: int = 1, **fields: object) -> int:
        async with self.sessions() as session:
            kb = await store.create_kb(session, owner_id=owner_id, name="kb", **fields)  # type: ignore[arg-type]
            return kb.id

    async def document(self, document_id: int) -> Document:
        async with self.sessions() as session:
            document = await store.get_document(session, document_id)
            assert document is not None
            return document

    async def num_chunks(self, document_id: int | None = None) -> int:
        query = select(func.count()).select_from(ChunkRow)
        if document_id is not None:
            query = query.where(ChunkRow.document_id == document_id)
        async with self.sessions() as session:
            return int(await session.scalar(query) or 0)

    def num_files(self) -> int:
        return sum(1 for path in self.blobs.root.rglob("*") if path.is_file())

    async def stop(self) -> None:
        await self.ingestor.close()
        await self.engine.dispose()


def run(data_dir: Path, body: Callable[[Harness], Awaitable[None]], **config: object) -> None:
    async def main() -> None:
        harness = Harness(data_dir)
        embed = config.pop("embed", fake_embed)
        await harness.start(embed, **config)  # type: ignore[arg-type]
        try:
            await body(harness)
        finally:
            await harness.stop()

    asyncio.run(main())


def test_ingest_stores_chunks_with_progress_and_is_searchable(data_dir: Path) -> None:
    progress: list[float] = []
    batch_sizes: list[int] = []
    watched: list[tuple[Harness, int]] = []  # the harness and the document being ingested

    async def embed(texts: list[str]) -> np.ndarray:
        batch_sizes.append(len(texts))
        harness, document_id = watched[0]
        progress.append((await harness.document(document_id)).progress)
        return await fake_embed(texts)

    async def body(h: Harness) -> None:
        upload = await h.ingestor.add(h.kb_id, "../../etc/manual.md", MANUAL)
        watched.append((h, upload.document_id))
        assert not upload.duplicate
        await h.ingestor.wait(upload.document_id)
        document = await h.document(upload.document_id)
        assert document.status is DocumentStatus.DONE and document.progress == 1.0
        assert document.file_name == "manual.md"  # no path from the client survives
        assert document.num_chunks == await h.num_chunks(upload.document_id) > 3
        hits = await search(await h.cache.get(h.kb_id), "E-4471", fake_embed, top_k=1)
        passage = hits[0].passage
        assert "E-4471" in passage.text and passage.heading == "Observatory > Faults"
        assert passage.file_name == "manual.md"

    run(data_dir, body, embed=embed, embed_batch_size=2)
    assert max(batch_sizes) == 2 and len(batch_sizes) > 1
    assert progress == sorted(progress) and progress[0] >= ingest.PREPARED_PROGRESS
    assert progress[-1] > progress[0]


def test_duplicates_are_detected_by_content(data_dir: Path) -> None:
    async def body(h: Harness) -> None:
        first = await h.ingestor.add(h.kb_id, "manual.md", MANUAL)
        again = await h.ingestor.add(h.kb_id, "renamed-copy.md", MANUAL)
        assert again.duplicate and again.document_id == first.document_id
        other_kb = await h.new_kb()
        elsewhere = await h.ingestor.add(other_kb, "manual.md", MANUAL)
        assert not elsewhere.duplicate and elsewhere.document_id != first.document_id
        for upload in (first, elsewhere):
            await h.ingestor.wait(upload.document_id)
        assert h.num_files() == 1  # the same bytes are stored once
        assert await h.ingestor.delete_document(first.document_id)
        assert h.num_files() == 1  # the other knowledge base still holds them
        assert await h.ingestor.delete_document(elsewhere.document_id)
        assert h.num_files() == 0 and await h.num_chunks() == 0
        assert not await h.ingestor.delete_document(first.document_id)

    run(data_dir, body)


def test_cancel_a_running_and_a_queued_job(data_dir: Path) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def gated_embed(texts: list[str]) -> np.ndarray:
        started.set()
        await release.wait()
        return await fake_embed(texts)

    async def body(h: Harness) -> None:
        running = await h.ingestor.add(h.kb_id, "manual.md", MANUAL)
        queued = await h.ingestor.add(h.kb_id, "notes.txt", NOTES)
        await started.wait()  # the first job is inside an embedding request
        assert (await h.document(running.document_id)).status is DocumentStatus.PROCESSING
        assert (await h.document(queued.document_id)).status is DocumentStatus.QUEUED
        assert await h.ingestor.cancel(queued.document_id)
        assert await h.ingestor.cancel(running.document_id)
        release.set()
        for upload in (running, queued):
            await h.ingestor.wait(upload.document_id)
            assert (await h.document(upload.document_id)).status is DocumentStatus.CANCELLED
        assert await h.num_chunks() == 0
        assert not await h.ingestor.cancel(running.document_id)  # nothing left to cancel
        again = await h.ingestor.add(h.kb_id, "manual.md", MANUAL)  # uploading again retries
        assert again.duplicate and again.document_id == running.document_id
        await h.ingestor.wait(again.document_id)
        assert (await h.document(again.document_id)).status is DocumentStatus.DONE

    run(data_dir, body, embed=gated_embed, max_concurrent_jobs=1)


def test_a_waiter_giving_up_leaves_the_job_running(data_dir: Path) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def gated_embed(texts: list[str]) -> np.ndarray:
        started.set()
        await release.wait()
        return await fake_embed(texts)

    async def body(h: Harness) -> None:
        upload = await h.ingestor.add(h.kb_id, "notes.txt", NOTES)
        await started.wait()
        impatient = asyncio.create_task(h.ingestor.wait(upload.document_id))
        await asyncio.sleep(0)  # let it start waiting
        impatient.cancel()
        await asyncio.gather(impatient, return_exceptions=True)
        release.set()
        await h.ingestor.wait(upload.document_id)
        assert (await h.document(upload.document_id)).status is DocumentStatus.DONE

    run(data_dir, body, embed=gated_embed)


def test_failures_are_recorded_or_refused_up_front(data_dir: Path) -> None:
    async def flaky_embed(texts: list[str]) -> np.ndarray:
        if any("八十" in text for text in texts):
            raise RuntimeError("embedding service answered 503")
        return await fake_embed(texts)

    async def body(h: Harness) -> None:
        corrupt = await h.ingestor.add(h.kb_id, "broken.pdf", b"%PDF-1.4\nnot a pdf at all")
        unreachable = await h.ingestor.add(h.kb_id, "notes.txt", NOTES)
        for upload in (corrupt, unreachable):
            await h.ingestor.wait(upload.document_id)
        broken = await h.document(corrupt.document_id)
        assert broken.status is DocumentStatus.FAILED and "PDF" in (broken.error or "")
        failed = await h.document(unreachable.document_id)
        assert failed.status is DocumentStatus.FAILED and "503" in (failed.error or "")
        blank = await h.ingestor.add(h.kb_id, "blank.txt", b"  \n\n ")
        await h.ingestor.wait(blank.document_id)
        empty = await h.document(blank.document_id)
        assert empty.status is DocumentStatus.FAILED and "no text" in (empty.error or "")
        with pytest.raises(UnsupportedFileType):
            await h.ingestor.add(h.kb_id, "photo.png", b"\x89PNG\r\n\x1a\n\x00\x00")
        with pytest.raises(FileTooLarge):
            await h.ingestor.add(h.kb_id, "big.txt", b"x" * 2048)
        with pytest.raises(Exception, match="FOREIGN KEY"):
            await h.ingestor.add(h.kb_id + 999, "orphan.txt", b"no such knowledge base")
        assert h.num_files() == 3  # the refused files were not stored

        lost = await h.ingestor.add(h.kb_id, "lost.txt", b"stored, then lost")
        h.blobs.path(h.blobs.put(b"stored, then lost")).unlink()  # before its job reads it
        await h.ingestor.wait(lost.document_id)
        missing = await h.document(lost.document_id)
        assert missing.status is DocumentStatus.FAILED
        assert str(h.data_dir) not in (missing.error or "") and "upload it again" in (
            missing.error or ""
        )

    run(data_dir, body, embed=flaky_embed, limits=ParseLimits(max_bytes=1024))


def test_concurrency_is_bounded_and_parsing_is_off_the_event_loop(data_dir: Path) -> None:
    active = 0
    max_active = 0
    workers: set[int] = set()

    async def counting_embed(texts: list[str]) -> np.ndarray:
        nonlocal active, max_active
        active += 1
        max_active = max(max_active, active)
        for _ in range(20):
            await asyncio.sleep(0)
        active -= 1
        return await fake_embed(texts)

    async def body(h: Harness) -> None:
        uploads = [
            await h.ingestor.add(h.kb_id, f"doc{i}.md", MANUAL + f"\n\nDocument {i}.".encode())
            for i in range(6)
        ]
        for upload in uploads:
            await h.ingestor.wait(upload.document_id)
            assert (await h.document(upload.document_id)).status is DocumentStatus.DONE
        pool = h.ingestor._executor
        assert isinstance(pool, concurrent.futures.ProcessPoolExecutor)  # off the GIL too
        workers.update(pool._processes or {})  # the pool's worker processes, by PID

    run(data_dir, body, embed=counting_embed, max_concurrent_jobs=2, embed_batch_size=3)
    assert 1 <= max_active <= 2
    assert 1 <= len(workers) <= 2 and os.getpid() not in workers


def test_reindex_delete_and_the_index_cache(data_dir: Path) -> None:
    async def body(h: Harness) -> None:
        manual = await h.ingestor.add(h.kb_id, "manual.md", MANUAL)
        notes = await h.ingestor.add(h.kb_id, "notes.txt", NOTES)
        for upload in (manual, notes):
            await h.ingestor.wait(upload.document_id)
        index = await h.cache.get(h.kb_id)
        assert await h.cache.get(h.kb_id) is index  # no change: no rebuild
        assert {p.file_name for p in index.passages} == {"manual.md", "notes.txt"}

        assert await h.ingestor.reindex(notes.document_id)
        assert await h.num_chunks(notes.document_id) == 0  # dropped until re-processed
        during = await h.cache.get(h.kb_id)
        assert during is not index and {p.file_name for p in during.passages} == {"manual.md"}
        await h.ingestor.wait(notes.document_id)
        assert (await h.document(notes.document_id)).status is DocumentStatus.DONE
        after = await h.cache.get(h.kb_id)
        assert len(after) == len(index)

        await h.ingestor.delete_document(manual.document_id)
        remaining = await h.cache.get(h.kb_id)
        assert {p.file_name for p in remaining.passages} == {"notes.txt"}
        await h.ingestor.delete_kb(h.kb_id)
        with pytest.raises(LookupError):
            await h.cache.get(h.kb_id)
        assert h.num_files() == 0 and await h.num_chunks() == 0

    run(data_dir, body)


def test_resume_finishes_jobs_interrupted_by_a_restart(data_dir: Path) -> None:
    async def body(h: Harness) -> None:
        sha256 = h.blobs.put(NOTES)
        async with h.sessions() as session:
            document = Document(
                kb_id=h.kb_id,
                file_name="notes.txt",
                content_sha256=sha256,
                size_bytes=len(NOTES),
                status=DocumentStatus.PROCESSING,  # the process died mid-job
                progress=0.4,
            )
            session.add(document)
            await session.commit()
            # the killed job had stored its first batch, and left its spool file behind
            stored = store.NewChunk(0, "half a job", None, None, "half job")
            await store.add_chunks(session, document.id, h.kb_id, [stored], np.ones((1, 8)), 0.4)
        stale, fresh = h.blobs.root / ".chunks-old", h.blobs.root / ".chunks-live"
        stale.write_bytes(b"x")
        fresh.write_bytes(b"x")
        os.utime(stale, (0, 0))  # long ago; `fresh` may be a live job's of another process
        assert await h.ingestor.resume() == 1
        await h.ingestor.wait(document.id)
        document = await h.document(document.id)
        assert document.status is DocumentStatus.DONE
        assert document.num_chunks == await h.num_chunks(document.id) >= 1
        assert "half a job" not in [p.text for p in (await h.cache.get(h.kb_id)).passages]
        assert not stale.exists() and fresh.exists()

    run(data_dir, body)


def test_close_leaves_unfinished_documents_queued(data_dir: Path) -> None:
    started = asyncio.Event()

    async def stuck_embed(texts: list[str]) -> np.ndarray:
        started.set()
        await asyncio.Event().wait()  # never answers
        raise AssertionError

    async def body(h: Harness) -> None:
        upload = await h.ingestor.add(h.kb_id, "notes.txt", NOTES)
        await started.wait()
        await h.ingestor.close()
        assert (await h.document(upload.document_id)).status is DocumentStatus.QUEUED

    run(data_dir, body, embed=stuck_embed)


def test_visibility_and_access(data_dir: Path) -> None:
    async def body(h: Harness) -> None:
        shared = await h.new_kb(owner_id=2, visibility=Visibility.SHARED_READ)
        writable = await h.new_kb(owner_id=2, visibility=Visibility.SHARED_WRITE)
        private = await h.new_kb(owner_id=2)
        async with h.sessions() as session:
            mine = [kb.id for kb in await store.list_kbs(session, user_id=1)]
            assert mine == [h.kb_id, shared, writable]
            every = [kb.id for kb in await store.list_kbs(session, user_id=1, is_admin=True)]
            assert every == [h.kb_id, shared, writable, private]
            kbs = {kb_id: await store.get_kb(session, kb_id) for kb_id in every}
        rights = {
            kb_id: (store.can_read(kb, 1), store.can_write(kb, 1)) for kb_id, kb in kbs.items()
        }
        assert rights == {
            h.kb_id: (True, True),
            shared: (True, False),
            writable: (True, True),
            private: (False, False),
        }
        assert store.can_write(kbs[private], 1, is_admin=True)
        with pytest.raises(ValueError):
            await h.new_kb(chunk_size=100, overlap=90)

    run(data_dir, body)


def test_a_large_file(data_dir: Path) -> None:
    paragraph = (
        "Section {i}: the dome shutter closes when wind gusts exceed 45 km/h. "
        "员工入职满一年后，每年享有带薪年休假，工龄满十年的年假为十天。"
    )
    text = "\n\n".join(paragraph.format(i=i) for i in range(8_000)).encode()  # ~1.3 MB

    async def body(h: Harness) -> None:
        upload = await h.ingestor.add(h.kb_id, "large.txt", text)
        await h.ingestor.wait(upload.document_id)
        document = await h.document(upload.document_id)
        assert document.status is DocumentStatus.DONE and document.size_bytes == len(text)
        assert document.num_chunks > len(text) // 3 // 500  # ~3 bytes a character, at most
        hits = await search(await h.cache.get(h.kb_id), "Section 7777", fake_embed, top_k=1)
        assert "Section 7777:" in hits[0].passage.text

    run(data_dir, body, embed_batch_size=256)


class SecondBatchGate:
    """An embedder that holds its second call until `release` is set (the first batch is
    stored by then), and fails its call number `fail_at`."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_at = 0
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if self.calls == 2:
            self.reached.set()
            await self.release.wait()
        if self.calls == self.fail_at:
            raise RuntimeError("embedding service answered 503")
        return await fake_embed(texts)


def test_batches_are_stored_as_embedded_but_searchable_only_when_done(data_dir: Path) -> None:
    """Each embedded batch is stored at once (no whole document held until the end), out of
    search until the last one is in; a failure half way deletes the stored batches."""
    gate = SecondBatchGate()

    async def body(h: Harness) -> None:
        upload = await h.ingestor.add(h.kb_id, "manual.md", MANUAL)
        await gate.reached.wait()  # the first batch is embedded and stored, the second waits
        assert await h.num_chunks(upload.document_id) == 2
        document = await h.document(upload.document_id)
        assert document.status is DocumentStatus.PROCESSING and document.num_chunks == 0
        assert len((await h.cache.get(h.kb_id)).passages) == 0  # not searchable yet
        gate.release.set()
        await h.ingestor.wait(upload.document_id)
        document = await h.document(upload.document_id)
        assert document.status is DocumentStatus.DONE
        assert document.num_chunks == await h.num_chunks(upload.document_id) > 4
        assert len((await h.cache.get(h.kb_id)).passages) == document.num_chunks

        gate.calls, gate.fail_at = 0, 3  # the same again, failing at the third batch
        assert await h.ingestor.reindex(upload.document_id)
        await h.ingestor.wait(upload.document_id)
        document = await h.document(upload.document_id)
        assert document.status is DocumentStatus.FAILED and "503" in (document.error or "")
        assert await h.num_chunks() == 0
        assert len((await h.cache.get(h.kb_id)).passages) == 0
        assert not list(h.blobs.root.glob(".chunks-*"))  # the spool files are gone

    run(data_dir, body, embed=gate, embed_batch_size=2)


def test_a_cancel_between_batches_deletes_the_stored_ones(data_dir: Path) -> None:
    gate = SecondBatchGate()

    async def body(h: Harness) -> None:
        upload = await h.ingestor.add(h.kb_id, "manual.md", MANUAL)
        await gate.reached.wait()
        assert await h.num_chunks(upload.document_id) == 2
        async with h.sessions() as session:  # a cancel seen at the next batch's write
            await store.set_status(session, upload.document_id, DocumentStatus.CANCELLED)
        gate.release.set()
        await h.ingestor.wait(upload.document_id)
        assert (await h.document(upload.document_id)).status is DocumentStatus.CANCELLED
        assert await h.num_chunks() == 0

    run(data_dir, body, embed=gate, embed_batch_size=2)


def _scheduling_policy() -> int:
    return os.sched_getscheduler(0)


def _mark_and_sleep(marker: str) -> None:
    import time

    Path(marker).touch()
    time.sleep(600)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
def test_parse_workers_run_idle_and_close_stops_a_busy_one(data_dir: Path) -> None:
    """A parse worker takes only CPU time nobody else wants; shutting down does not wait for
    a parse in progress (a 30 MB PDF takes minutes)."""

    async def body(h: Harness) -> None:
        pool = h.ingestor._executor
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(pool, _scheduling_policy) == os.SCHED_IDLE
        marker = data_dir / "busy"
        busy = loop.run_in_executor(pool, _mark_and_sleep, str(marker))
        while not marker.exists():  # the worker is inside the long job
            await asyncio.sleep(0.05)
        await h.ingestor.close()
        # The job's future fails once its worker is gone; without the terminate it would wait
        # out the sleep (the bound only keeps a regression from hanging the suite).
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            await asyncio.wait_for(busy, 120)

    run(data_dir, body, max_concurrent_jobs=1)
