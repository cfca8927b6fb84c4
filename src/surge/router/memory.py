"""What a model costs in memory while loaded, and which idle models to evict to fit another.

Estimates read file headers only (safetensors JSON headers, GGUF tensor tables), never weights.
A model with N replicas costs N times one replica: each replica is a process with its own
weights and its own preallocated KV cache (or batch buffers).
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from surge.config import EngineConfig
from surge.encoders.bundled import DEFAULT_EMBEDDING_MODEL_NAME, is_complete_model_dir
from surge.engine.kv_sizing import kv_bytes_per_block
from surge.models.default_model import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME, default_cache_dir
from surge.models.quant import gguf_stays_quantized, kernel_can_take, row_bytes
from surge.router.spec import ModelKind, ModelSpec

logger = logging.getLogger(__name__)

# Activations of one dynamic batch in an encoder worker (a token budget of ~16k tokens through
# a base/large encoder, plus the tokenizer and torch's allocator slack); a flat allowance
# because the worker's batch size, not the model, bounds it.
ENCODER_BATCH_BUFFER_BYTES = 512 * 1024**2
# dtype "auto" is bf16 on hardware that runs it natively (every recent x86 and GPU) and fp32
# elsewhere; the estimate assumes bf16, a caller that knows better passes auto_dtype_bytes=4.
AUTO_DTYPE_BYTES = 2
# --quantization int8 / int4 on an HF checkpoint: Q8_0 (34 bytes) / Q4_1 (20 bytes) per 32 bf16
# weights (64 bytes); counted over all weights, though norms and biases stay bf16 (a few %)
_QUANTIZED_FRACTION = {"int8": 34 / 64, "int4": 20 / 64}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ST_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_MAX_SAFETENSORS_HEADER = 100 * 1024**2  # the format's own limit
# The bundled models before their first fetch: SmolLM2-135M's parameters, and the size of
# all-MiniLM-L6-v2's model.safetensors (22.7M fp32 parameters).
_DEFAULT_MODEL_PARAMS = 135_000_000
_DEFAULT_EMBEDDING_MODEL_BYTES = 91_000_000


@dataclass(frozen=True)
class ModelCost:
    """Estimated bytes a loaded model holds: its weights and its KV cache or batch buffers."""

    weights_bytes: int
    cache_bytes: int

    @property
    def total_bytes(self) -> int:
        """Weights plus cache."""
        return self.weights_bytes + self.cache_bytes


def format_bytes(num_bytes: int) -> str:
    """Human units, 1024-based: 1536 -> "1.5 KiB", 8 * 1024**3 -> "8.0 GiB"."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def estimate_cost(
    spec: ModelSpec, base: EngineConfig | None = None, auto_dtype_bytes: int = AUTO_DTYPE_BYTES
) -> ModelCost:
    """The memory `spec` takes once loaded, all replicas; `base` is the CLI's engine config.

    Chat: weights at the engine dtype, or at their quantized size (a GGUF's matrices the kernels
    take, --quantization int8/int4) plus the whole preallocated KV cache (kv_cache_memory, or
    num_kv_blocks blocks).
    Embedding/rerank: weight file sizes plus ENCODER_BATCH_BUFFER_BYTES. ValueError if no files.
    """
    if spec.kind is ModelKind.CHAT:
        config = spec.engine_config(base)
        dtype_bytes = _DTYPE_BYTES.get(config.dtype, auto_dtype_bytes)
        path = _local_path(spec.path)
        if path is None:  # the bundled alias, not fetched yet: its size is known
            weights, dims = _DEFAULT_MODEL_PARAMS * dtype_bytes, None
        elif path.is_file():
            weights, dims = _gguf_weights(path, dtype_bytes, config.quantization)
        else:
            weights, dims = _hf_weights(path, dtype_bytes), _hf_kv_dims(path)
            weights = int(weights * _QUANTIZED_FRACTION.get(config.quantization, 1.0))
        cache = _kv_cache_bytes(config, dims, dtype_bytes)
    else:
        weights, cache = _encoder_weights(spec.path), ENCODER_BATCH_BUFFER_BYTES
    return ModelCost(weights * spec.replicas, cache * spec.replicas)


def _local_path(path: str) -> Path | None:
    """The file or directory of `path`; the bundled alias's GGUF if fetched, else None."""
    if path == DEFAULT_MODEL_NAME:
        cached = default_cache_dir() / DEFAULT_MODEL_FILE
        return cached if cached.is_file() else None
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))  # the loader serves a directory's only .gguf
        if len(ggufs) == 1:
            return ggufs[0]
    if not p.exists():
        raise ValueError(f"model path {path!r} does not exist")
    return p


def _gguf_weights(
    path: Path, dtype_bytes: int, quantization: str
) -> tuple[int, tuple[int, int, int] | None]:
    """Weight bytes once loaded and (layers, kv heads, head dim) of a GGUF file: the matrices
    the quantized kernel takes at their kernel size where they stay quantized (as the loader's
    resolve_quantization decides for bf16), the rest dequantized."""
    import gguf  # numpy only; imported here so spec parsing never pays for it

    reader = gguf.GGUFReader(str(path))
    bf16_bytes = 2 * sum(int(t.n_elements) for t in reader.tensors)
    keep_quantized = dtype_bytes == 2 and gguf_stays_quantized(quantization, bf16_bytes)
    weights = 0
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if keep_quantized and kernel_can_take(int(t.tensor_type), shape):
            weights += shape[0] * row_bytes(int(t.tensor_type), shape[1])
        else:
            weights += int(t.n_elements) * dtype_bytes

    def meta(key: str) -> int | None:
        field = reader.fields.get(key)
        value = field.contents() if field is not None else None
        return value if isinstance(value, int) else None

    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    layers, heads = meta(f"{arch}.block_count"), meta(f"{arch}.attention.head_count")
    kv_heads = meta(f"{arch}.attention.head_count_kv") or heads
    head_dim = meta(f"{arch}.attention.key_length")
    hidden = meta(f"{arch}.embedding_length")
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    dims = (layers, kv_heads, head_dim) if layers and kv_heads and head_dim else None
    return weights, dims


def _weight_files(directory: Path, recursive: bool) -> tuple[list[Path], list[Path]]:
    glob = directory.rglob if recursive else directory.glob
    return sorted(glob("*.safetensors")), sorted(glob("*.bin"))


def _hf_weights(directory: Path, dtype_bytes: int) -> int:
    """Bytes of an HF directory's weights at the engine dtype (safetensors headers), else file sizes."""
    safetensors, bins = _weight_files(directory, recursive=False)
    if not safetensors and not bins:
        raise ValueError(
            f"model directory {str(directory)!r} has no *.safetensors or *.bin weights"
        )
    if not safetensors:
        return sum(f.stat().st_size for f in bins)  # pickled: no cheap element count
    total = 0
    for f in safetensors:
        elements = _safetensors_elements(f)
        total += f.stat().st_size if elements is None else elements * dtype_bytes
    return total


def _safetensors_elements(path: Path) -> int | None:
    """Number of elements in a safetensors file, from its JSON header; None if unreadable."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(path.stat().st_size - 8, _MAX_SAFETENSORS_HEADER):
                raise ValueError(f"header length {length} is past the end of the file")
            header = json.loads(f.read(length))
        return sum(
            math.prod(info["shape"]) for key, info in header.items() if key != "__metadata__"
        )
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        logger.warning("unreadable safetensors header in %s; counting its file size", path)
        return None


def _hf_kv_dims(directory: Path) -> tuple[int, int, int] | None:
    """(layers, kv heads, head dim) from config.json, or None when it doesn't say."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return layers, kv_heads, head_dim


def _kv_cache_bytes(
    config: EngineConfig, dims: tuple[int, int, int] | None, dtype_bytes: int
) -> int:
    """The engine preallocates all of it: kv_cache_memory, or num_kv_blocks blocks when set."""
    if config.num_kv_blocks is None:
        return config.kv_cache_memory
    if dims is None:
        logger.warning("model dims unknown; estimating num_kv_blocks as kv_cache_memory")
        return config.kv_cache_memory
    layers, kv_heads, head_dim = dims
    return config.num_kv_blocks * kv_bytes_per_block(
        layers, kv_heads, head_dim, dtype_bytes, config.block_size
    )


def _encoder_weights(path: str) -> int:
    """File sizes of an encoder's weights, submodules included (sentence-transformers' 2_Dense/)."""
    if path == DEFAULT_EMBEDDING_MODEL_NAME:
        cached = default_cache_dir() / DEFAULT_EMBEDDING_MODEL_NAME
        if not is_complete_model_dir(cached):
            return _DEFAULT_EMBEDDING_MODEL_BYTES
        path = str(cached)
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(f"model directory {str(directory)!r} does not exist")
    safetensors, bins = _weight_files(directory, recursive=True)
    files = safetensors or bins  # repos often ship both formats; the worker loads one
    if not files:
        raise ValueError(
            f"model directory {str(directory)!r} has no *.safetensors or *.bin weights"
        )
    return sum(f.stat().st_size for f in files)


@dataclass(frozen=True)
class EvictionCandidate:
    """A loaded model as eviction sees it."""

    name: str
    cost: ModelCost
    last_used: float
    pinned: bool
    num_in_flight: int


def choose_evictions(
    candidates: Sequence[EvictionCandidate], need_bytes: int, budget_bytes: int, in_use_bytes: int
) -> list[str] | None:
    """Models to unload so `need_bytes` more fit in the budget: [] if it fits, None if it can't.

    The rule (Ollama's): least recently used first, skipping pinned models and models with
    requests in flight, taking models in that order until enough is freed. Size does not
    reorder the list; it only decides where the list stops. Ties in last_used go to the bigger
    model, then by name, so the result is deterministic.
    """
    if in_use_bytes + need_bytes <= budget_bytes:
        return []
    evictable = sorted(
        (c for c in candidates if not c.pinned and c.num_in_flight == 0),
        key=lambda c: (c.last_used, -c.cost.total_bytes, c.name),
    )
    chosen: list[str] = []
    freed = 0
    for c in evictable:
        chosen.append(c.name)
        freed += c.cost.total_bytes
        if in_use_bytes - freed + need_bytes <= budget_bytes:
            return chosen
    return None
