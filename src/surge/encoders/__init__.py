"""Encoder workers: embedding and rerank models in their own processes, with dynamic batching.

Usage (from an asyncio server)::

    client = await EncoderClient.start(EncoderConfig(pull_default_embedding_model()))
    result = await client.embed(["hello", "world"])  # result.embeddings: float32 [2, dim]
    await client.close()

Importing this package does not import torch or sentence-transformers: only the worker does.
"""

from surge.encoders.bundled import DEFAULT_EMBEDDING_MODEL_NAME, pull_default_embedding_model
from surge.encoders.client import (
    EmbedResult,
    EncoderClient,
    EncoderDeadError,
    EncoderRequestError,
    EncoderStats,
    RerankResult,
)
from surge.encoders.config import EncoderConfig, EncoderInfo
from surge.encoders.kinds import EncoderKind, detect_encoder_kind

__all__ = [
    "DEFAULT_EMBEDDING_MODEL_NAME",
    "EmbedResult",
    "EncoderClient",
    "EncoderConfig",
    "EncoderDeadError",
    "EncoderInfo",
    "EncoderKind",
    "EncoderRequestError",
    "EncoderStats",
    "RerankResult",
    "detect_encoder_kind",
    "pull_default_embedding_model",
]
