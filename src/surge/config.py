"""Every engine knob in one frozen place, and the values the engine learns at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class EngineConfig:
    """Options of one engine; frozen, never written back at run time."""

    model: str | None = None  # None = the bundled default model (SmolLM2-135M-Instruct GGUF)
    dtype: str = "auto"  # "auto" (bf16 on CPU when supported, else fp32), "float32", "bfloat16", "float16"
    device: str = "cpu"
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_memory: int = 2 * 1024**3  # bytes of KV cache (CPU)
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests force preemption with it)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None = the model's own context length
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_threads: int | None = None  # torch intra-op threads; None = leave torch's default
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError("num_kv_blocks must be positive")


@dataclass(frozen=True)
class EngineLimits:
    """What the engine found when it started: passed explicitly, never stored in the config."""

    num_kv_blocks: int
    block_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the whole KV cache can hold."""
        return self.num_kv_blocks * self.block_size
