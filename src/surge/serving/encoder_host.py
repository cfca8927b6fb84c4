"""An embedding or rerank model on Ray Serve: `EncoderHost`, the deployment whose replicas each
run one encoder worker, and `HandleEncoders`, how the ingress's RemoteEncoderClient reaches it.

Each call is one EncoderClient call on the replica Serve picks, so concurrent calls landing on
one replica are batched together by its worker (dynamic batching works per replica). What the
replica raises reaches the caller wrapped in Ray's RayTaskError; RemoteEncoderClient unwraps it.
Like surge.serving.ray, this module needs the `surge[ray]` extra.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, TypeVar

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from surge.encoders import (
    DEFAULT_EMBEDDING_MODEL_NAME,
    EmbedResult,
    EncoderClient,
    EncoderConfig,
    EncoderInfo,
    RerankResult,
    pull_default_embedding_model,
)
from surge.router import ModelSpec
from surge.server.models import ENCODER_NICE
from surge.serving.remote_encoder import EncoderReply

logger = logging.getLogger(__name__)

_R = TypeVar("_R")


class EncoderHost:
    """One encoder worker of an embedding or rerank model, as a Serve replica."""

    async def __init__(self, spec: ModelSpec, num_threads: int) -> None:
        self.host_id = serve.get_replica_context().replica_id.unique_id
        config = await asyncio.to_thread(host_encoder_config, spec, num_threads)
        self.client = await EncoderClient.start(config)
        logger.info("encoder host %s ready (%s)", self.host_id, spec.name)

    async def info(self) -> EncoderInfo:
        """What the worker found in the model."""
        assert self.client.info is not None, "set by EncoderClient.start"
        return self.client.info

    async def embed(
        self, inputs: list[str] | list[list[int]], truncate: bool, normalize: bool
    ) -> EncoderReply[EmbedResult]:
        """EncoderClient.embed here (an EncoderRequestError reaches the caller in a RayTaskError)."""
        return self._reply(await self.client.embed(inputs, truncate=truncate, normalize=normalize))

    async def rerank(
        self, query: str, documents: list[str], truncate: bool
    ) -> EncoderReply[RerankResult]:
        return self._reply(await self.client.rerank(query, documents, truncate=truncate))

    async def count_tokens(self, texts: list[str]) -> EncoderReply[list[int]]:
        return self._reply(await self.client.count_tokens(texts))

    def _reply(self, result: _R) -> EncoderReply[_R]:
        stats = self.client.stats  # counted before the result was handed over: it includes it
        return EncoderReply(self.host_id, result, stats.num_batches, stats.num_rows)

    def check_health(self) -> None:
        """Unhealthy once the worker died: Serve replaces this replica."""
        if not self.client.is_alive():
            raise RuntimeError(f"encoder worker of {self.client.config.model_name} is not running")

    async def __del__(self) -> None:
        client: EncoderClient | None = getattr(self, "client", None)  # None: __init__ failed
        if client is not None:
            await client.close()


def host_encoder_config(spec: ModelSpec, num_threads: int) -> EncoderConfig:
    """A model's encoder config on a host (as `surge serve` makes it); the bundled model is
    fetched there, on the host's node."""
    path = Path(spec.path)
    if spec.path == DEFAULT_EMBEDDING_MODEL_NAME:
        path = pull_default_embedding_model()
    return EncoderConfig(
        path,
        kind=spec.kind.value,  # type: ignore[arg-type]
        name=spec.name,
        num_threads=num_threads,
        nice=ENCODER_NICE,
    )


class HandleEncoders:
    """RemoteEncoders over a Serve deployment handle (Serve picks the replica of each call)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def info(self) -> EncoderInfo:
        return await _result(self._handle.info.remote())  # type: ignore[no-any-return]

    async def embed(
        self, inputs: list[str] | list[list[int]], truncate: bool, normalize: bool
    ) -> EncoderReply[EmbedResult]:
        response = self._handle.embed.remote(inputs, truncate, normalize)
        return await _result(response)  # type: ignore[no-any-return]

    async def rerank(
        self, query: str, documents: list[str], truncate: bool
    ) -> EncoderReply[RerankResult]:
        response = self._handle.rerank.remote(query, documents, truncate)
        return await _result(response)  # type: ignore[no-any-return]

    async def count_tokens(self, texts: list[str]) -> EncoderReply[list[int]]:
        return await _result(self._handle.count_tokens.remote(texts))  # type: ignore[no-any-return]


async def _result(response: DeploymentResponse) -> Any:
    """A call's answer; a caller that went away cancels the call on its replica too."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
