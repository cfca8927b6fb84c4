"""RemoteEncoderClient: an embedding or rerank model whose encoder workers are remote hosts.

It has the part of EncoderClient's interface the server and the registry use (`info`, `embed`,
`rerank`, `count_tokens`, `stats`, `num_in_flight`, `is_alive`, `close`), so the routes, admission
and metrics don't know the model runs elsewhere. Each call goes to some host (the transport picks
one: Ray Serve's handle) and comes back as an EncoderReply. Failures keep their local meaning:
the caller's bad input is an EncoderRequestError (a 400), anything else (the host's worker died,
the host itself is gone, the transport failed) an EncoderDeadError (a 503, and the registry
restarts the model: here, a new client over the same hosts).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from surge.encoders import (
    EmbedResult,
    EncoderDeadError,
    EncoderInfo,
    EncoderRequestError,
    EncoderStats,
    RerankResult,
)
from surge.serving.remote_client import _describe

logger = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True)
class EncoderReply(Generic[R]):
    """One call's answer from an encoder host, with the model batches and rows that host has
    run so far (its own EncoderClient's counts: the metrics of the model add them up)."""

    host: str  # which host answered (Ray Serve's replica id)
    result: R
    num_batches: int
    num_rows: int


class RemoteEncoders(Protocol):
    """A model's encoder hosts as a transport reaches them (a Ray Serve deployment handle)."""

    async def info(self) -> EncoderInfo:
        """What some host's worker found in the model (waits for a host to start)."""
        ...

    async def embed(
        self, inputs: list[str] | list[list[int]], truncate: bool, normalize: bool
    ) -> EncoderReply[EmbedResult]: ...

    async def rerank(
        self, query: str, documents: list[str], truncate: bool
    ) -> EncoderReply[RerankResult]: ...

    async def count_tokens(self, texts: list[str]) -> EncoderReply[list[int]]: ...


class RemoteEncoderClient:
    """An encoder model over remote hosts, with EncoderClient's interface as the server uses it.

    One host dying never makes this client "dead" (is_alive stays True until close): the call
    that hit it fails with EncoderDeadError, and the transport sends later calls to the others
    (Ray Serve replaces the dead replica)."""

    def __init__(self, hosts: RemoteEncoders, info: EncoderInfo) -> None:
        self._hosts = hosts
        self.info: EncoderInfo | None = info
        self._host_counts: dict[str, tuple[int, int]] = {}  # host -> (batches, rows) so far
        self._num_in_flight = 0
        self._closed = False

    @classmethod
    async def start(cls, hosts: RemoteEncoders) -> RemoteEncoderClient:
        """Wait for a host (one starts if the model scaled to zero) and take its model's info;
        EncoderDeadError if none can be reached."""
        try:
            info = await hosts.info()
        except Exception as e:
            raise _local_error(e) from e
        return cls(hosts, info)

    @property
    def pid(self) -> int | None:
        return None  # the workers run on the hosts

    @property
    def num_in_flight(self) -> int:
        """Calls waiting for their answer."""
        return self._num_in_flight

    @property
    def stats(self) -> EncoderStats:
        """Model batches and rows summed over every host heard from, each host's latest counts
        (a host that went away keeps its last ones, so the sums never go down). The sizes of
        single batches stay on the hosts: batch_size_counts and recent_batch_sizes are empty."""
        counts = self._host_counts.values()
        return EncoderStats(
            num_batches=sum(b for b, _ in counts), num_rows=sum(r for _, r in counts)
        )

    def is_alive(self) -> bool:
        return not self._closed

    async def embed(
        self, inputs: list[str] | list[list[int]], *, truncate: bool = True, normalize: bool = False
    ) -> EmbedResult:
        """Embed texts or token-id lists on some host (as EncoderClient.embed)."""
        return await self._call(lambda: self._hosts.embed(inputs, truncate, normalize))

    async def rerank(
        self, query: str, documents: list[str], *, truncate: bool = True
    ) -> RerankResult:
        """Score each document against the query on some host (as EncoderClient.rerank)."""
        return await self._call(lambda: self._hosts.rerank(query, documents, truncate))

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text with the model's special tokens (as EncoderClient.count_tokens)."""
        return await self._call(lambda: self._hosts.count_tokens(texts))

    async def close(self) -> None:
        """Refuse further calls; the hosts stay (they are the deployment's, not this client's)."""
        self._closed = True

    async def _call(self, send: Callable[[], Awaitable[EncoderReply[R]]]) -> R:
        if self._closed:
            raise EncoderDeadError("encoder client is closed")
        self._num_in_flight += 1
        try:
            reply = await send()
        except Exception as e:
            raise _local_error(e) from e
        finally:
            self._num_in_flight -= 1
        batches, rows = self._host_counts.get(reply.host, (0, 0))
        # replies of one host may arrive out of order: its counts only grow
        self._host_counts[reply.host] = (max(batches, reply.num_batches), max(rows, reply.num_rows))
        return reply.result


def _local_error(error: Exception) -> EncoderRequestError | EncoderDeadError:
    """A remote call's failure as the local client would raise it. Ray wraps what a replica
    raised in a RayTaskError whose `cause` is the original; a replica (actor) that died, or a
    transport error, has no such cause and means the model is unreachable."""
    cause = getattr(error, "cause", None)
    original = cause if isinstance(cause, BaseException) else error
    if isinstance(original, EncoderRequestError):
        return EncoderRequestError(str(original))
    if isinstance(original, EncoderDeadError):
        return EncoderDeadError(str(original))
    logger.warning("encoder host call failed: %s", _describe(error))
    return EncoderDeadError(f"encoder host unreachable: {_describe(error)}")
