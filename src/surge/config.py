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
    # "auto" (a GGUF stays quantized if its bf16 copy would be big), "gguf" (it always does),
    # "none" (dequantize to dtype), "int8" / "int4" (an HF checkpoint quantized at load);
    # see models/quant.py
    quantization: str = "auto"
    num_threads: int | None = None  # torch intra-op threads; None = leave torch's default
    seed: int = 0
    # the CPUs this engine's core runs on (a replica's share; set by the replica set, not a flag)
    cpu_affinity: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError("num_kv_blocks must be positive")
        if self.quantization not in ("auto", "gguf", "none", "int8", "int4"):
            raise ValueError(
                f"quantization must be auto, gguf, none, int8 or int4: {self.quantization!r}"
            )


@dataclass(frozen=True)
class EngineLimits:
    """What the engine found when it started: passed explicitly, never stored in the config."""

    num_kv_blocks: int
    block_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    vocab_size: int | None = None  # the model's; prompt token ids must be below it

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the whole KV cache can hold."""
        return self.num_kv_blocks * self.block_size


@dataclass(frozen=True)
class ReplicaConfig:
    """How many engine cores serve one chat model, where they run, how requests are routed to
    them and carried over when one fails (see engine/routing.py for the routing rule)."""

    replicas: int = 1
    # CPU: each replica runs on its own share of this process's CPUs (threads = its share), and
    # more replicas than CPUs is refused. False: every replica may use every CPU.
    pin_cpus: bool = True
    devices: tuple[str, ...] = ()  # CUDA: one replica per device; () = every visible device
    affinity_blocks: int = 4  # prefix affinity keys on the prompt's first this many KV blocks
    affinity_margin: int = 4  # the load guard: sequences a preferred replica may be ahead by...
    affinity_ratio: float = 0.5  # ...or this share of the least-loaded one's, if larger
    max_failovers: int = 3  # a sequence moved this many times ends with an error on the next
    drain_grace: float = 30.0  # seconds a removed replica may finish its work before failover
    # hosts behind each replica: 1 here; under Ray Serve one replica fronts a deployment of up
    # to max_replicas engine hosts, and admission counts all their sequence slots
    hosts: int = 1

    def __post_init__(self) -> None:
        if (
            isinstance(self.replicas, bool)
            or not isinstance(self.replicas, int)
            or self.replicas < 1
        ):
            raise ValueError(f"replicas must be an integer >= 1, got {self.replicas!r}")
        if self.affinity_blocks < 0 or self.affinity_margin < 0 or self.affinity_ratio < 0:
            raise ValueError("affinity_blocks, affinity_margin and affinity_ratio must be >= 0")
        if self.hosts < 1:
            raise ValueError(f"hosts must be >= 1, got {self.hosts!r}")
        if self.max_failovers < 0 or self.drain_grace < 0:
            raise ValueError("max_failovers and drain_grace must be >= 0")


@dataclass(frozen=True)
class SupervisorConfig:
    """How the front end watches and restarts an engine core."""

    # A core with work pending that sends nothing for this long is stuck: killed and restarted.
    # Generous, because one step of a long prefill on a slow CPU can take many seconds.
    stall_timeout: float = 60.0
    restart_delay: float = 0.5  # first restart's delay; doubles with each crash in the window
    max_restart_delay: float = 30.0
    max_restarts: int = 5  # crashes within restart_window before the breaker opens (no restart)
    restart_window: float = 300.0

    def __post_init__(self) -> None:
        for name in ("stall_timeout", "restart_window", "max_restart_delay"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.restart_delay < 0 or self.max_restarts < 1:
            raise ValueError("restart_delay must be >= 0 and max_restarts >= 1")


@dataclass(frozen=True)
class ServerConfig:
    """Options of the HTTP service (`surge serve`); frozen like EngineConfig."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None = the engine's model name
    # sha256 hex of the keys of --api-key / $SURGE_API_KEY: plain keys are hashed as the flags
    # are read and never kept
    api_key_hashes: tuple[str, ...] = ()
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
    # a stream whose client has read nothing for this long, or has this many characters waiting
    # unread, is aborted (the client stopped reading; its request must not hold the engine)
    stream_read_timeout: float = 60.0
    max_unread_chars: int = 1_000_000
    # Host headers accepted (names, "*.example.com" or "*"); None = any, except that an open API
    # on a loopback address accepts only loopback names (no DNS rebinding from a web page)
    allowed_hosts: tuple[str, ...] | None = None
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; none = no CORS
    enable_docs: bool = True  # /docs and /openapi.json (behind the API keys when keys are set)
    max_connections: int | None = None  # uvicorn's limit_concurrency: more -> 503
    timeout_keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    admin_key_hash: str | None = None  # sha256 of --admin-api-key: load/unload routes; None = off
    embedding_truncate: bool = True  # inputs past an encoder's window: truncate (else 400)
    unload_grace: float = 30.0  # seconds an unloading model's in-flight requests may take
    encoder_threads: int | None = None  # torch threads per embedding/rerank worker; None = 1
    # chat models' replicas: placement, routing and failover (a model's own count is its spec's)
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)

    def __post_init__(self) -> None:
        if self.stream_read_timeout <= 0 or self.max_unread_chars <= 0:
            raise ValueError("stream_read_timeout and max_unread_chars must be positive")
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
