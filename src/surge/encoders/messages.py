"""The encoder worker's message types (msgspec structs), one tagged union per socket direction."""

from __future__ import annotations

import msgspec


class EncodeRequest(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """Embed texts, or token-id lists taken as the model's whole input (specials included)."""

    req_id: str
    texts: list[str] | None = None  # exactly one of texts and token_ids is set
    token_ids: list[list[int]] | None = None
    truncate: bool = True  # False: an input over max_seq_length fails the request
    normalize: bool = False  # L2-normalize each row (on top of any Normalize module of the model)


class RerankRequest(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """Score each document against the query with a cross-encoder."""

    req_id: str
    query: str
    documents: list[str]
    truncate: bool = True


class CountTokensRequest(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """Count each text's tokens (specials included, never truncated); runs no model."""

    req_id: str
    texts: list[str]


class AbortRequest(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """Drop the rows of these requests that have not run yet (their callers went away)."""

    req_ids: list[str]


class EncoderShutdown(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """Ask the worker to exit its loop and close its sockets."""


class EncoderResult(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """The answer to one request: its own rows, or an error that fails it alone."""

    req_id: str
    error: str | None = None
    embeddings: bytes = b""  # float32 C-order array of `shape`
    shape: tuple[int, int] = (0, 0)
    scores: list[float] = []
    token_counts: list[int] = []  # tokens of each input as the model saw it
    num_tokens: int = 0  # their sum: the request's usage
    batch_sizes: list[int] = []  # rows of each model batch this request's rows ran in
    # Every model batch the worker ran since its previous reply, so a client counts each once.
    worker_batch_sizes: list[int] = []


class EncoderReady(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """The worker loaded its model and accepts requests."""

    name: str
    kind: str
    dim: int | None
    max_seq_length: int
    vocab_size: int


class EncoderLoadFailed(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """The worker could not load its model and is exiting: why."""

    error: str


# What travels on each socket: tagged, so one decoder tells the kinds apart.
EncoderInput = EncodeRequest | RerankRequest | CountTokensRequest | AbortRequest | EncoderShutdown
EncoderOutput = EncoderResult | EncoderReady | EncoderLoadFailed
