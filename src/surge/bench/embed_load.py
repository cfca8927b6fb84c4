"""The load of `surge bench embed`: seeded knowledge-base chunks, a closed loop of embedding
clients over HTTP, and sentence-transformers in-process (the upper bound)."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from surge.bench.loadgen import make_session
from surge.bench.metrics import percentile
from surge.bench.workloads import english_text

# Plain Chinese prose written for this file (how a knowledge base about RAG might read):
# Chinese chunks are windows over it, as English ones are windows over workloads' prose.
_CHINESE_TEXT = (
    "企业知识库通常由产品手册、常见问题、会议纪要和技术文档组成。为了让检索增强生成系统找到正确的段落，"
    "文档会先被切分成长度适中的片段，每个片段再转换成向量保存在向量数据库中。用户提问时，系统把问题也"
    "转换成向量，按照余弦相似度取出最相近的几个片段，交给大语言模型生成回答。片段太短会丢失上下文，"
    "太长又会混入无关内容，因此很多团队选择两百到五百个字符的长度，并让相邻片段保留少量重叠。数据更新"
    "时，只需要重新计算发生变化的片段，而不必重建整个索引。为了保证质量，工程师会定期抽查检索结果，"
    "记录哪些问题没有找到答案，再据此补充文档或调整切分规则。在中文场景中，分词方式、标点符号和全角"
    "字符都会影响向量的效果，所以预处理阶段要统一编码并去掉多余的空白。部署在本地服务器上的嵌入模型"
    "可以避免把内部资料发送到外部服务，同时降低每次调用的成本。当并发请求增多时，服务端把多个请求合并"
    "成一个批次送入模型，可以显著提高吞吐量，但也要控制等待时间，避免单个请求的延迟变得太长。监控指标"
    "包括每秒处理的句子数、平均批次大小、排队时间和错误率，运维人员根据这些数据决定是否增加机器或者调整"
    "线程数。"
)
# A Chinese word is about 1.5 characters, so an n-word chunk is 1.5 n characters of either language.
CHARS_PER_CHINESE_WORD = 1.5


def chinese_text(rng: random.Random, num_words: int) -> str:
    """About `num_words` words of the built-in Chinese prose, from a random start (wrapping)."""
    num_chars = max(1, round(num_words * CHARS_PER_CHINESE_WORD))
    start = rng.randrange(len(_CHINESE_TEXT))
    return "".join(_CHINESE_TEXT[(start + i) % len(_CHINESE_TEXT)] for i in range(num_chars))


def make_chunks(
    num_texts: int,
    seed: int = 0,
    chinese_fraction: float = 0.5,
    min_words: int = 20,
    max_words: int = 200,
) -> list[str]:
    """Seeded knowledge-base chunks: English or Chinese, lognormal lengths (median 80 words)
    clamped to [min_words, max_words]; the same arguments give the same texts."""
    if not 0 < min_words <= max_words:
        raise ValueError("need 0 < min_words <= max_words")
    rng = random.Random(f"embed:{seed}")
    median = min(max(80.0, min_words), max_words)
    texts = []
    for _ in range(num_texts):
        num_words = round(rng.lognormvariate(math.log(median), 0.6))
        num_words = min(max_words, max(min_words, num_words))
        chinese = rng.random() < chinese_fraction
        texts.append(chinese_text(rng, num_words) if chinese else english_text(rng, num_words))
    return texts


@dataclass(slots=True)
class EmbedLoad:
    """What a closed loop of embedding clients measured."""

    num_clients: int
    texts_per_request: int
    duration_s: float = 0.0
    latencies: list[float] = field(default_factory=list)  # of the requests that succeeded
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        """The point's numbers (latencies in ms; None where no request succeeded)."""
        ok = len(self.latencies)
        duration = max(self.duration_s, 1e-9)

        def ms(q: float) -> float | None:
            return 1000 * percentile(self.latencies, q) if ok else None

        return {
            "clients": self.num_clients,
            "texts_per_request": self.texts_per_request,
            "requests": ok,
            "errors": len(self.errors),
            "first_error": self.errors[0] if self.errors else None,
            "duration_s": round(self.duration_s, 3),
            "sentences_per_s": ok * self.texts_per_request / duration,
            "latency_p50_ms": ms(50),
            "latency_p99_ms": ms(99),
        }


async def post_embeddings(
    session: aiohttp.ClientSession, base_url: str, model: str, texts: Sequence[str]
) -> str | None:
    """One /v1/embeddings request (base64, as the openai client sends); its error, or None."""
    body = {
        "model": model,
        "input": texts[0] if len(texts) == 1 else list(texts),
        "encoding_format": "base64",
    }
    try:
        async with session.post(base_url + "/v1/embeddings", json=body) as resp:
            if resp.status != 200:
                text = (await resp.read()).decode(errors="replace")[:300]
                return f"HTTP {resp.status}: {text}"
            data = (await resp.json()).get("data") or []
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if len(data) == len(texts) else f"{len(data)} embeddings for {len(texts)} texts"


async def embed_closed_loop(
    base_url: str,
    model: str,
    texts: Sequence[str],
    num_clients: int,
    duration_s: float,
    texts_per_request: int = 1,
    stop: asyncio.Event | None = None,
) -> EmbedLoad:
    """`num_clients` clients, each sending its next request when its last one ends, until
    `duration_s` has passed or `stop` is set; requests in flight then still finish and count."""
    load = EmbedLoad(num_clients, texts_per_request)
    next_request = itertools.count()  # shared; taken between awaits, so no lock is needed
    deadline = time.perf_counter() + duration_s

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline and not (stop is not None and stop.is_set()):
            first = next(next_request) * texts_per_request
            batch = [texts[(first + j) % len(texts)] for j in range(texts_per_request)]
            sent = time.perf_counter()
            error = await post_embeddings(session, base_url, model, batch)
            if error is None:
                load.latencies.append(time.perf_counter() - sent)
            else:
                load.errors.append(error)

    async with make_session(num_clients + 4) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(num_clients)))
        load.duration_s = time.perf_counter() - start
    return load


def measure_direct(
    model_dir: Path, texts: Sequence[str], batch_size: int, duration_s: float, num_threads: int
) -> dict[str, object]:
    """sentence-transformers' `encode(..., batch_size=batch_size)` in this process with
    `num_threads` torch threads, for at least `duration_s`: the bound a server can approach.

    Each call gets WINDOW_BATCHES batches' worth of texts, which `encode` sorts by length before
    batching, as surge's worker sorts a window of as many batches: the same padding advantage."""
    import torch

    from surge.encoders.batching import WINDOW_BATCHES
    from surge.encoders.config import EncoderConfig
    from surge.encoders.runner import load_st_model

    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        model = load_st_model(EncoderConfig(model_dir), "embedding")
        per_call = batch_size * WINDOW_BATCHES
        calls = [
            [texts[(i + j) % len(texts)] for j in range(per_call)]
            for i in range(0, len(texts), per_call)
        ]
        model.encode(calls[0][:batch_size], batch_size=batch_size)  # warm-up
        num_sentences = 0
        start = time.perf_counter()
        while num_sentences == 0 or time.perf_counter() - start < duration_s:
            chunk = calls[(num_sentences // per_call) % len(calls)]
            model.encode(chunk, batch_size=batch_size, show_progress_bar=False)
            num_sentences += len(chunk)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    return {
        "batch_size": batch_size,
        "texts_per_call": per_call,
        "num_threads": num_threads,
        "sentences": num_sentences,
        "duration_s": round(elapsed, 3),
        "sentences_per_s": num_sentences / elapsed,
    }
