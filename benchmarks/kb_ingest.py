"""Knowledge-base ingestion on this machine's CPU, without the HTTP service: the CPU stage
(parse, split, tokenize) for English and Chinese text, a whole ingestion into SQLite with a
model-free embedder (everything but the model), embedding chunks with all-MiniLM-L6-v2
in-process, and search latency over the result. Seeded; `--mb` sets the size per language.

    python benchmarks/kb_ingest.py --mb 2
"""

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from surge.app.db import create_schema, make_engine, make_sessions
from surge.app.kb import store
from surge.app.kb.blobs import BlobStore
from surge.app.kb.cache import IndexCache
from surge.app.kb.index import search
from surge.app.kb.ingest import Ingestor, _prepare
from surge.app.kb.parse import ParseLimits
from surge.app.kb.split import SplitConfig

EN_WORDS = (
    "dome shutter wind humidity telescope mirror motor fault reset controller visitor ticket "
    "policy travel receipt hotel approval manager chain brake tyre pressure flour water starter "
    "the a of and to in is with for on must should when after before every"
).split()
ZH_WORDS = (
    "员工 年假 申请 流程 主管 审批 数据库 备份 节点 集群 端口 错误 延迟 网络 绿茶 水温 "
    "保存 垃圾 分类 回收 电池 热线 预约 罚款 的 了 在 和 是 需要 可以 每天 提前"
).split()


def make_text(words: list[str], num_bytes: int, sep: str, end: str, rng: random.Random) -> bytes:
    paragraphs, size = [], 0
    while size < num_bytes:
        sentences = [
            sep.join(rng.choice(words) for _ in range(rng.randint(6, 18))) + end
            for _ in range(rng.randint(2, 6))
        ]
        paragraph = (" " if sep else "").join(sentences)
        paragraphs.append(paragraph)
        size += len(paragraph.encode()) + 2
    return "\n\n".join(paragraphs).encode()


async def fake_embed(texts: list[str]) -> np.ndarray:
    vectors = np.random.default_rng(len(texts)).standard_normal((len(texts), 384))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


async def ingest(files: dict[str, bytes]) -> tuple[float, int, IndexCache, int]:
    data_dir = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    engine = make_engine(f"sqlite+aiosqlite:///{data_dir / 'kb.db'}")
    await create_schema(engine)
    sessions = make_sessions(engine)
    ingestor = Ingestor(sessions, BlobStore(data_dir / "files"), fake_embed)
    async with sessions() as session:
        kb = await store.create_kb(session, owner_id=1, name="bench")
    start = time.perf_counter()
    uploads = [await ingestor.add(kb.id, name, data) for name, data in files.items()]
    for upload in uploads:
        await ingestor.wait(upload.document_id)
    elapsed = time.perf_counter() - start
    async with sessions() as session:
        num_chunks = sum(d.num_chunks for d in await store.list_documents(session, kb.id))
    await ingestor.close()
    return elapsed, num_chunks, IndexCache(sessions), kb.id


async def search_latency(cache: IndexCache, kb_id: int) -> tuple[float, float]:
    start = time.perf_counter()
    index = await cache.get(kb_id)
    build = time.perf_counter() - start
    queries = ["dome shutter fault reset", "员工年假申请流程", "hotel receipt approval"] * 10
    start = time.perf_counter()
    for query in queries:
        await search(index, query, fake_embed, top_k=5)
    return build, (time.perf_counter() - start) / len(queries)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=2.0, help="MB of text per language")
    parser.add_argument("--embed-chunks", type=int, default=256, help="chunks for MiniLM")
    args = parser.parse_args()
    rng = random.Random(0)
    num_bytes = int(args.mb * 1024 * 1024)
    files = {
        "en.txt": make_text(EN_WORDS, num_bytes, " ", ".", rng),
        "zh.txt": make_text(ZH_WORDS, num_bytes, "", "。", rng),
    }
    _prepare("warm.txt", "预热 jieba".encode(), SplitConfig(), ParseLimits())  # load jieba once
    chunks = []
    for name, data in files.items():
        start = time.perf_counter()
        file_chunks, _ = _prepare(name, data, SplitConfig(), ParseLimits())
        elapsed = time.perf_counter() - start
        chunks += file_chunks
        mb = len(data) / 2**20
        print(
            f"prepare {name}: {mb:.1f} MB, {len(file_chunks)} chunks in {elapsed:.2f} s "
            f"= {mb / elapsed * 60:.0f} MB/min, {len(file_chunks) / elapsed:.0f} chunks/s"
        )

    elapsed, num_chunks, cache, kb_id = asyncio.run(ingest(files))
    mb = sum(len(d) for d in files.values()) / 2**20
    print(
        f"ingest (no model) {mb:.1f} MB, {num_chunks} chunks in {elapsed:.2f} s "
        f"= {mb / elapsed * 60:.0f} MB/min, {num_chunks / elapsed:.0f} chunks/s"
    )
    build, per_query = asyncio.run(search_latency(cache, kb_id))
    print(
        f"index build {build * 1000:.0f} ms; search {per_query * 1000:.1f} ms/query "
        f"over {num_chunks} chunks"
    )

    from sentence_transformers import SentenceTransformer

    from surge.encoders.bundled import pull_default_embedding_model

    model = SentenceTransformer(str(pull_default_embedding_model()), device="cpu")
    texts = [chunk.text for chunk in rng.sample(chunks, min(args.embed_chunks, len(chunks)))]
    model.encode(texts[:8])
    start = time.perf_counter()
    model.encode(texts, batch_size=64)
    elapsed = time.perf_counter() - start
    mb = sum(len(text.encode()) for text in texts) / 2**20
    print(
        f"MiniLM in-process: {len(texts) / elapsed:.0f} chunks/s = {mb / elapsed * 60:.2f} MB/min "
        f"of these chunks (overlap included)"
    )


if __name__ == "__main__":
    main()
