"""Tokens, BM25 (against rank-bm25), fusion, and searching an index with a model-free embedder."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from surge.app.kb.bm25 import BM25, tokenize
from surge.app.kb.embed import EmbeddingError, service_embedder
from surge.app.kb.index import (
    Fusion,
    KnowledgeIndex,
    Passage,
    SearchMode,
    mix,
    rrf,
    search,
)
from tests.app_kb.conftest import fake_embed, fake_vectors

TEXTS = [
    "Fault E-4471 means the dome rotation motor has stalled.",
    "The weather mast reports wind and humidity every ten seconds.",
    "知识库的混合检索结合了关键词索引和向量相似度。",
    "Hotels should not exceed 180 euros per night; form TX-209 approves the trip.",
    "",
]


def make_index(texts: list[str] = TEXTS) -> KnowledgeIndex:
    passages = [
        Passage(i + 100, i, f"doc{i}.txt", None, None, text) for i, text in enumerate(texts)
    ]
    return KnowledgeIndex(passages, [tokenize(t) for t in texts], fake_vectors(texts))


def test_tokenize_english_codes_and_chinese() -> None:
    assert tokenize("The Dome's MOTOR stalled, error E-4471 (v2.3.1)!") == [
        "dome",
        "motor",
        "stalled",
        "error",
        "e-4471",
        "e",
        "4471",
        "v2.3.1",
        "v2",
        "3",
        "1",
    ]
    tokens = tokenize("知识库的混合检索")
    assert {"知识", "知识库", "混合", "检索"} <= set(tokens) and "的" not in tokens
    assert tokenize("ＡＢＣ１２３ café") == ["abc123", "café"]  # full-width folded (NFKC)
    assert tokenize("the of 的 了 ...") == []


class LuceneIdfBM25(BM25Okapi):
    """rank-bm25's Okapi BM25 with Lucene's always-positive idf (what BM25 computes)."""

    def _calc_idf(self, nd: dict[str, int]) -> None:
        self.idf = {w: math.log1p((self.corpus_size - n + 0.5) / (n + 0.5)) for w, n in nd.items()}


def test_bm25_scores_match_rank_bm25() -> None:
    corpus = [tokenize(text) for text in TEXTS * 3 + ["dome dome dome motor", "wind"]]
    query = tokenize("dome motor wind 检索 unknown")
    ours = BM25(corpus).scores(query)
    reference = LuceneIdfBM25(corpus).get_scores(query)
    np.testing.assert_allclose(ours, reference, rtol=1e-5)


def test_a_word_of_one_chunk_in_two_still_scores() -> None:
    """Okapi's idf is 0 for a term in half the chunks: a 2-chunk file found nothing by keyword."""
    bm25 = BM25([tokenize("the dome motor failed"), tokenize("wind speed limits")])
    assert bm25.scores(tokenize("dome"))[0] > 0 and bm25.idf("dome") > 0


def test_bm25_coverage_is_the_share_of_query_idf() -> None:
    bm25 = BM25([["a1", "b1"], ["a1"], ["c1"]])
    coverage = bm25.coverage(["a1", "b1"], np.array([0, 1, 2]))
    assert coverage[0] == pytest.approx(1.0) and coverage[2] == 0.0 and 0 < coverage[1] < 1
    assert bm25.coverage(["zz"], np.array([0]))[0] == 0.0  # a term no chunk has still counts


def test_rrf_and_mix() -> None:
    fused = rrf([[1, 2, 3], [3, 1]], k=60)
    assert fused[1] == pytest.approx(1 / 61 + 1 / 62) and fused[2] == pytest.approx(1 / 62)
    assert sorted(fused, key=lambda d: -fused[d]) == [1, 3, 2]
    assert mix(0.6, 1.0) == pytest.approx(0.8) and mix(0.6, 1.0, weight=0.0) == pytest.approx(0.6)


@pytest.mark.parametrize("fusion", list(Fusion))
def test_search_modes_and_scores(fusion: Fusion) -> None:
    index = make_index()
    query = "what does E-4471 mean"
    vector = fake_vectors([query])[0]
    hits = index.search(query, vector, top_k=3, fusion=fusion)
    assert hits[0].passage.chunk_id == 100
    top = hits[0]
    assert top.bm25 > 0 and top.bm25_rank == 1 and top.vector_rank == 1
    assert 0 < top.coverage <= 1 and -1 <= top.vector <= 1
    assert [h.hybrid for h in hits] == sorted((h.hybrid for h in hits), reverse=True)

    bm25_only = index.search(query, None, mode=SearchMode.BM25, fusion=fusion)
    assert [h.passage.chunk_id for h in bm25_only] == [100]  # only chunks matching a term
    vector_only = index.search(query, vector, top_k=10, mode=SearchMode.VECTOR, fusion=fusion)
    assert len(vector_only) == len(TEXTS)
    assert [h.vector for h in vector_only] == sorted((h.vector for h in vector_only), reverse=True)


def test_search_chinese_and_empty_index() -> None:
    hits = asyncio.run(search(make_index(), "混合检索是什么", fake_embed, top_k=1))
    assert hits[0].passage.chunk_id == 102
    empty = KnowledgeIndex([], [], np.zeros((0, 0), dtype=np.float32))
    assert asyncio.run(search(empty, "anything", fake_embed)) == []
    with pytest.raises(ValueError):
        KnowledgeIndex(make_index().passages, [], fake_vectors(TEXTS))


def test_service_embedder_posts_batches_and_normalizes() -> None:
    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        if body["input"] == ["fail"]:
            return httpx.Response(503, text="busy")
        data = [{"index": i, "embedding": [3.0, 4.0]} for i in reversed(range(len(body["input"])))]
        return httpx.Response(200, json={"data": data})

    async def main() -> tuple[np.ndarray, str]:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc/v1/") as client:
            embed = service_embedder(client, "all-MiniLM-L6-v2")
            vectors = await embed(["a", "b"])
            with pytest.raises(EmbeddingError) as info:
                await embed(["fail"])
            return vectors, str(info.value)

    vectors, error = asyncio.run(main())
    np.testing.assert_allclose(vectors, [[0.6, 0.8], [0.6, 0.8]])
    assert seen[0] == {"model": "all-MiniLM-L6-v2", "input": ["a", "b"]}
    assert "503" in error
