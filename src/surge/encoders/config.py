"""The encoder worker's frozen config, and what the worker reports about its model once loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surge.encoders.kinds import EncoderKind

DEFAULT_MAX_BATCH_TOKENS = 16384
DEFAULT_MAX_BATCH_SIZE = 256


@dataclass(frozen=True)
class EncoderConfig:
    """One encoder model served by one worker process; frozen, never written back."""

    model: str | Path  # a local model directory; never a hub id (no hub access at run time)
    kind: EncoderKind | None = None  # None = detect from the directory (kinds.detect_encoder_kind)
    name: str | None = None  # the name clients use; None = the directory's name
    num_threads: int | None = None  # torch intra-op threads in the worker; None = torch's default
    # A model batch closes when its padded size (rows x longest row) would pass this budget...
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    # ...or when it holds this many rows.
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    device: str = "cpu"
    # Added to the worker's nice value: on a machine shared with chat engines, bulk embedding
    # (knowledge-base ingestion) takes the CPU chat leaves, instead of starving chat's streams.
    nice: int = 0

    def __post_init__(self) -> None:
        if self.kind not in (None, "embedding", "rerank"):
            raise ValueError(f"kind must be 'embedding', 'rerank' or None, got {self.kind!r}")
        if self.max_batch_tokens <= 0:
            raise ValueError("max_batch_tokens must be positive")
        if self.max_batch_size <= 0:
            raise ValueError("max_batch_size must be positive")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError("num_threads must be positive")

    @property
    def model_name(self) -> str:
        """The name clients use for this model."""
        return self.name or Path(self.model).name


@dataclass(frozen=True)
class EncoderInfo:
    """What the worker found when it loaded its model."""

    name: str
    kind: EncoderKind
    dim: int | None  # embedding size; None for a rerank model (one score per document)
    max_seq_length: int  # tokens per input (per query+document pair for rerank), specials included
    vocab_size: int  # token ids must lie in [0, vocab_size)
