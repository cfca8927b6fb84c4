"""Reranking retrieved passages with the model service's `/v1/rerank` (a cross-encoder) when it
serves a rerank model: hybrid retrieval finds a pool of candidates, the cross-encoder orders them
by reading query and passage together. The relevance threshold stays hybrid retrieval's (its
scores are calibrated; a cross-encoder's logits are not)."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence

import httpx

from surge.app.kb.index import Hit

RerankFn = Callable[[str, list[str]], Awaitable[list[float]]]

# candidates hybrid retrieval hands the reranker, per passage the answer will use
POOL_FACTOR = 3


class RerankError(RuntimeError):
    """The service's rerank answer was refused or malformed."""


def service_reranker(client: httpx.AsyncClient, base: str, model: str) -> RerankFn:
    """Scores of each document for the query, from `POST {base}/rerank`, in the input order."""

    async def rerank(query: str, documents: list[str]) -> list[float]:
        resp = await client.post(
            f"{base}/rerank",
            json={
                "model": model,
                "query": query,
                "documents": documents,
                "return_documents": False,
            },
        )
        if resp.status_code >= 400:
            raise RerankError(f"rerank answered {resp.status_code}")
        scores = [float("-inf")] * len(documents)
        try:
            for result in resp.json()["results"]:
                scores[int(result["index"])] = float(result["relevance_score"])
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise RerankError(f"a malformed rerank answer: {e}") from e
        return scores

    return rerank


def reorder(hits: Sequence[Hit], scores: Sequence[float], top_k: int) -> list[Hit]:
    """The hits by rerank score, best first (ties keep the hybrid order), each carrying it."""
    ranked = sorted(range(len(hits)), key=lambda i: -scores[i])
    return [dataclasses.replace(hits[i], rerank=scores[i]) for i in ranked[:top_k]]
