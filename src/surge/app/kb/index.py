"""Hybrid retrieval over one knowledge base: BM25 and cosine similarity, fused.

A `KnowledgeIndex` is built once from the chunks' stored tokens and embeddings (see
`cache.IndexCache`) and then only read: searching is a few array operations per query term
(BM25 postings), one matrix-vector product and a sort, done in a worker thread by `search`.

Candidates are the union of BM25's and the vectors' top `num_candidates`. Two fusions:

- `MIX` (the default): 0.5 × cosine similarity + 0.5 × keyword coverage, where coverage is
  the share of the query's idf mass the chunk contains (BM25's evidence, normalized to 0-1 the
  same way in every knowledge base). Both parts are absolute, so the fused score also is.
- `RRF`: reciprocal rank fusion, Σ 1 / (k + rank) over the two rankings with k = 60 (Cormack,
  Clarke and Büttcher, SIGIR 2009, found 60 robust across collections; a large k keeps one
  ranker's first place from outweighing agreement between both). A chunk no query term
  matches has no BM25 rank.

Measured on the golden set in tests/app_kb (44 questions, all-MiniLM-L6-v2; the test prints the
table): hit@1 / hit@3 are 0.84 / 0.93 with MIX and 0.66 / 0.86 with RRF (BM25 alone 0.64 /
0.64, vectors alone 0.61 / 0.75). RRF loses on paraphrased questions: a chunk that shares
one common word with the question gets a BM25 rank, and RRF lets that rank, however weak the
match, outvote the vectors' first choice; MIX weighs how much of the question matched. The
weight is not tuned: 0.4 and 0.5 scored the same, 0.3 to 0.7 within 0.05. Chunks are embedded
without their heading (with it: hit@3 0.86-0.89 instead of 0.91-0.93), while their BM25 tokens
include it (`indexed_text`).

Each hit carries both absolute scores (cosine, coverage) so `cite.select_relevant` can
decide whether anything relevant was found at all."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from surge.app.kb.bm25 import BM25, tokenize
from surge.app.kb.followup import CONTEXT_WEIGHT

# The embedding function the index is given: texts → (len(texts), dim) float32, L2-normalized.
EmbedFn = Callable[[list[str]], Awaitable[np.ndarray]]

RRF_K = 60
DEFAULT_TOP_K = 5
DEFAULT_NUM_CANDIDATES = 50  # per ranker, before fusion
MIX_WEIGHT = 0.5  # of keyword coverage against cosine similarity


class SearchMode(str, enum.Enum):
    HYBRID = "hybrid"
    BM25 = "bm25"
    VECTOR = "vector"


class Fusion(str, enum.Enum):
    MIX = "mix"  # cosine similarity and keyword coverage, averaged (the default)
    RRF = "rrf"  # reciprocal rank fusion


@dataclass(frozen=True, slots=True)
class Passage:
    """A chunk as retrieval returns it: its text and where it came from."""

    chunk_id: int
    document_id: int
    file_name: str
    page: int | None
    heading: str | None
    text: str


@dataclass(frozen=True, slots=True)
class Hit:
    """A retrieved passage and every score the retrieval test page shows."""

    passage: Passage
    hybrid: float  # the fused score this list is ordered by (in HYBRID mode)
    bm25: float  # raw BM25; 0 when no query term matches
    vector: float  # cosine similarity, -1 to 1
    coverage: float  # share of the query's idf mass present in the passage, 0 to 1
    bm25_rank: int | None  # 1-based rank among the BM25 candidates, None outside them
    vector_rank: int | None
    rerank: float | None = None  # the service's cross-encoder score, when it reranked them


def indexed_text(heading: str | None, text: str) -> str:
    """What is tokenized for BM25: the chunk with its heading path, which often names the
    topic the chunk's own sentences leave implicit."""
    return f"{heading}\n{text}" if heading else text


class KnowledgeIndex:
    """BM25 and vectors over a knowledge base's passages, searched many times per build."""

    def __init__(
        self,
        passages: Sequence[Passage],
        tokens: Sequence[Sequence[str]],
        embeddings: np.ndarray,
    ) -> None:
        if not len(passages) == len(tokens) == len(embeddings):
            raise ValueError("passages, tokens and embeddings must have one row each")
        self.passages = list(passages)
        self._bm25 = BM25(tokens)
        self._vectors = np.ascontiguousarray(embeddings, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.passages)

    def search(
        self,
        query: str,
        query_vector: np.ndarray | None,
        *,
        top_k: int = DEFAULT_TOP_K,
        mode: SearchMode = SearchMode.HYBRID,
        fusion: Fusion = Fusion.MIX,
        num_candidates: int = DEFAULT_NUM_CANDIDATES,
        context: str = "",
        context_weight: float = CONTEXT_WEIGHT,
    ) -> list[Hit]:
        """The `top_k` best passages for `query` (whose embedding is `query_vector`). A
        follow-up's `context` (the earlier turns, `followup.SearchQuery`) adds its BM25 terms
        at `context_weight`, in the scores and in the coverage; `query_vector` then already
        holds it (`search` embeds both)."""
        if not self.passages or top_k < 1:
            return []
        query_tokens, weights = weighted_tokens(query, context, context_weight)
        bm25 = self._bm25.scores(query_tokens, weights)
        if query_vector is None:
            vector = np.zeros(len(self.passages), dtype=np.float32)
        else:
            vector = self._vectors @ np.asarray(query_vector, dtype=np.float32)
        bm25_order = _top(bm25, num_candidates, positive_only=True)
        vector_order = _top(vector, num_candidates) if query_vector is not None else []
        candidates = np.asarray(list(dict.fromkeys(bm25_order + vector_order)), dtype=np.int64)
        coverage = dict(
            zip(
                candidates.tolist(),
                self._bm25.coverage(query_tokens, candidates, weights),
                strict=True,
            )
        )
        if fusion is Fusion.RRF:
            fused = rrf([bm25_order, vector_order])
        else:
            fused = {doc: mix(vector[doc], coverage[doc]) for doc in coverage}
        ranked = {
            SearchMode.HYBRID: sorted(fused, key=lambda doc: (-fused[doc], doc)),
            SearchMode.BM25: bm25_order,
            SearchMode.VECTOR: vector_order,
        }[mode]
        bm25_rank = {doc: rank for rank, doc in enumerate(bm25_order, 1)}
        vector_rank = {doc: rank for rank, doc in enumerate(vector_order, 1)}
        return [
            Hit(
                passage=self.passages[doc],
                hybrid=float(fused[doc]),
                bm25=float(bm25[doc]),
                vector=float(vector[doc]),
                coverage=float(coverage[doc]),
                bm25_rank=bm25_rank.get(doc),
                vector_rank=vector_rank.get(doc),
            )
            for doc in ranked[:top_k]
        ]


def weighted_tokens(
    query: str, context: str, context_weight: float
) -> tuple[list[str], list[float]]:
    """The query's BM25 tokens (weight 1), then the context's that the query lacks (weight
    `context_weight`)."""
    tokens = tokenize(query)
    own = set(tokens)
    extra = [token for token in tokenize(context) if token not in own] if context else []
    return tokens + extra, [1.0] * len(tokens) + [context_weight] * len(extra)


def _top(scores: np.ndarray, k: int, *, positive_only: bool = False) -> list[int]:
    """Indices of the `k` highest scores, best first (ties by index, so results are stable)."""
    candidates = np.flatnonzero(scores > 0) if positive_only else np.arange(len(scores))
    order = np.lexsort((candidates, -scores[candidates]))[:k]
    return [int(doc) for doc in candidates[order]]


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal rank fusion: each ranking adds 1 / (k + rank) to the documents it ranks."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, 1):
            fused[doc] = fused.get(doc, 0.0) + 1.0 / (k + rank)
    return fused


def mix(vector: float, coverage: float, weight: float = MIX_WEIGHT) -> float:
    """The `MIX` score: (1 - `weight`) × cosine similarity + `weight` × keyword coverage."""
    return float((1 - weight) * vector + weight * coverage)


async def search(
    index: KnowledgeIndex,
    query: str,
    embed: EmbedFn,
    *,
    top_k: int = DEFAULT_TOP_K,
    mode: SearchMode = SearchMode.HYBRID,
    fusion: Fusion = Fusion.MIX,
    context: str = "",
    context_weight: float = CONTEXT_WEIGHT,
) -> list[Hit]:
    """Embed the query (unless BM25 alone is asked for), then search in a worker thread. With
    a follow-up's `context` the query vector is the question's embedding plus `context_weight`
    times the context's, normalized (one embedding request for both)."""
    vector = None
    if mode is not SearchMode.BM25 and len(index):
        vectors = await embed([query, context] if context else [query])
        vector = query_vector(vectors, context_weight)
    return await asyncio.to_thread(
        index.search,
        query,
        vector,
        top_k=top_k,
        mode=mode,
        fusion=fusion,
        context=context,
        context_weight=context_weight,
    )


def query_vector(vectors: np.ndarray, context_weight: float) -> np.ndarray:
    """The question's embedding (row 0), plus `context_weight` times the context's (row 1 when
    there is one), L2-normalized."""
    vector = np.asarray(vectors[0], dtype=np.float32)
    if len(vectors) > 1:
        vector = vector + context_weight * np.asarray(vectors[1], dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
