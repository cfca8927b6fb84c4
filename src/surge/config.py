"""Every engine knob in one frozen place, and the values the engine learns at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class EngineConfig:
    """Options of one engine; frozen, never written back at run time."""

    model: str | None = None  # None = the bundled default model (SmolLM2-135M-Instruct GGUF)
    dtype: str = (
        "auto"  # "auto" (bf16 on CPU when supported, else fp32), "float32", "bfloat16", "float16"
    )
    device: str = "cpu"
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_memory: int = 2 * 1024**3  # bytes of KV cache (CPU)
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests force preemption with it)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None = the model's own context length
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    cpu_kernels: bool = True  # fused C++ kernels on CPU (built on first use); False = pure torch
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


@dataclass(frozen=True)
class ServerConfig:
    """Options of the HTTP service (`surge serve`); frozen like EngineConfig."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None = the engine's model name
    api_keys: tuple[str, ...] = ()  # plain keys from --api-key; hashed when the app starts
    api_keys_file: str | None = None  # one key per line, or JSON lines with per-key limits
    max_queue: int = 256  # sequences waiting beyond --max-num-seqs; more -> 429
    request_timeout: float | None = None  # seconds from arrival to the last token
    queue_timeout: float | None = None  # seconds from arrival to the first token
    keepalive_interval: float = 15.0  # seconds between SSE `: keep-alive` comments
    max_body_bytes: int = 8 * 1024**2
    rate_limit_rpm: int | None = None  # default requests/minute per key; None = no limit
    rate_limit_tpm: int | None = None  # default tokens/minute per key (prompt + generated)
    max_concurrent_per_key: int | None = None  # default in-flight requests per key
    default_priority: int = 0  # lower runs earlier, as in vLLM
    shutdown_grace: float = 30.0  # seconds in-flight requests may take after SIGTERM
    retry_after: int = 1  # seconds clients are told to wait after a 429 for a full queue

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be positive")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        for name in ("request_timeout", "queue_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")
