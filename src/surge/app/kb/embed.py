"""The embedding function ingestion and search are given, backed by the model service's
OpenAI-compatible `/v1/embeddings` (the app is a client of the service like any other)."""

from __future__ import annotations

import httpx
import numpy as np

from surge.app.kb.index import EmbedFn


class EmbeddingError(RuntimeError):
    """The service's answer can't be used (an HTTP error, or the wrong number of vectors)."""


def service_embedder(client: httpx.AsyncClient, model: str) -> EmbedFn:
    """`embed(texts)` posting to `embeddings` on `client` (whose base URL ends in /v1/)."""

    async def embed(texts: list[str]) -> np.ndarray:
        response = await client.post("embeddings", json={"model": model, "input": texts})
        if response.status_code != 200:
            raise EmbeddingError(
                f"embeddings request failed: HTTP {response.status_code} {response.text[:200]}"
            )
        rows = sorted(response.json()["data"], key=lambda row: row["index"])
        if len(rows) != len(texts):
            raise EmbeddingError(f"asked for {len(texts)} embeddings, got {len(rows)}")
        vectors = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    return embed
