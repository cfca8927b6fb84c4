"""/v1/embeddings (OpenAI's shape) and /v1/rerank (vLLM's, Jina's and Cohere's), on the encoder
workers."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Awaitable
from typing import TypeVar

import numpy as np
from fastapi import APIRouter

from surge.encoders import EncoderDeadError, EncoderRequestError
from surge.router import Lease, ModelKind
from surge.server.protocol import APIError, EmbeddingRequest, RerankRequest, usage
from surge.server.state import KeyDep, ServerState, StateDep, request_keep_alive

router = APIRouter()
_T = TypeVar("_T")
JSON = dict[str, object]


@router.post("/v1/embeddings", operation_id="create_embeddings")
async def create_embeddings(body: EmbeddingRequest, state: StateDep, key: KeyDep) -> JSON:
    """Embeddings of texts or token-id lists, in the order given."""
    name = state.resolve(body.model, ModelKind.EMBEDDING, key)
    inputs = body.inputs()
    truncate = state.config.embedding_truncate if body.truncate is None else body.truncate
    with state.admission.hold(key) as charge:
        lease = await state.acquire(name, request_keep_alive(body.keep_alive))
        async with lease:
            client = state.encoder(lease)
            info = client.info
            _check_token_ids(inputs, info.vocab_size if info is not None else None)
            dim = info.dim if info is not None else None
            if body.dimensions is not None and body.dimensions != dim:
                raise APIError(
                    400,
                    f"{name!r} makes {dim}-dimensional embeddings and can't shorten them "
                    f"to {body.dimensions}",
                    param="dimensions",
                )
            result = await _run(state, lease, client.embed(inputs, truncate=truncate))
        charge(result.num_tokens)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(row, body.encoding_format)}
        for i, row in enumerate(result.embeddings)
    ]
    return {
        "object": "list",
        "data": data,
        "model": name,
        "usage": {"prompt_tokens": result.num_tokens, "total_tokens": result.num_tokens},
    }


@router.post("/v1/rerank", operation_id="rerank")
@router.post("/rerank", operation_id="rerank_alias", include_in_schema=False)
async def rerank(body: RerankRequest, state: StateDep, key: KeyDep) -> JSON:
    """Documents scored against the query by a cross-encoder, best first (top_n of them)."""
    name = state.resolve(body.model, ModelKind.RERANK, key)
    documents = body.texts()
    truncate = state.config.embedding_truncate if body.truncate is None else body.truncate
    with state.admission.hold(key) as charge:
        lease = await state.acquire(name, request_keep_alive(body.keep_alive))
        async with lease:
            client = state.encoder(lease)
            result = await _run(
                state, lease, client.rerank(body.query, documents, truncate=truncate)
            )
        charge(result.num_tokens)
    order = sorted(range(len(documents)), key=lambda i: result.scores[i], reverse=True)
    results: list[JSON] = []
    for i in order[: body.top_n or len(order)]:
        item: JSON = {"index": i, "relevance_score": result.scores[i]}
        if body.return_documents:
            item["document"] = {"text": documents[i]}
        results.append(item)
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": name,
        "results": results,
        "usage": usage(result.num_tokens, 0).model_dump(exclude_none=True),
    }


async def _run(state: ServerState, lease: Lease, work: Awaitable[_T]) -> _T:
    """Await an encoder call: bad input -> 400; a dead worker -> 503 and the model is failed
    (the next request restarts it)."""
    try:
        return await work
    except EncoderRequestError as e:
        raise APIError(400, str(e), param="input") from None
    except EncoderDeadError as e:
        state.registry.mark_failed(lease.name, str(e))
        raise APIError(
            503, f"the model's worker died: {e}", type="service_unavailable", code="worker_dead"
        ) from None


def _check_token_ids(inputs: list[str] | list[list[int]], vocab_size: int | None) -> None:
    if not inputs or isinstance(inputs[0], str) or vocab_size is None:
        return
    for ids in inputs:
        if not ids or any(not 0 <= t < vocab_size for t in ids):  # type: ignore[union-attr]
            raise APIError(
                400, f"token ids must be non-empty lists in [0, {vocab_size})", param="input"
            )


def _encode(row: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
        return base64.b64encode(row.astype("<f4").tobytes()).decode()
    return row.tolist()
