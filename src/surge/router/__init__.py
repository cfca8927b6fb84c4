"""Several models in one service: specs and their sources, memory costs, and the registry."""

from surge.router.config_file import ConfigDefaults, ConfigFile, collect_specs, load_config_file
from surge.router.detect import detect_kind, scan_models_dir
from surge.router.lease import AbortInFlight, Estimator, KeepAlive, Lease, Starter
from surge.router.memory import (
    EvictionCandidate,
    ModelCost,
    choose_evictions,
    estimate_cost,
    format_bytes,
)
from surge.router.models import ModelRegistry
from surge.router.spec import (
    DEFAULT_KEEP_ALIVE_S,
    ModelKind,
    ModelSpec,
    parse_keep_alive,
    parse_memory_size,
    parse_model_arg,
)
from surge.router.state import (
    InsufficientMemoryError,
    ModelEvent,
    ModelHandle,
    ModelLoadError,
    ModelNotFound,
    ModelState,
    ModelStatus,
    backoff_delay,
)

__all__ = [
    "DEFAULT_KEEP_ALIVE_S",
    "AbortInFlight",
    "ConfigDefaults",
    "ConfigFile",
    "Estimator",
    "EvictionCandidate",
    "InsufficientMemoryError",
    "KeepAlive",
    "Lease",
    "ModelCost",
    "ModelEvent",
    "ModelHandle",
    "ModelKind",
    "ModelLoadError",
    "ModelNotFound",
    "ModelRegistry",
    "ModelSpec",
    "ModelState",
    "ModelStatus",
    "Starter",
    "backoff_delay",
    "choose_evictions",
    "collect_specs",
    "detect_kind",
    "estimate_cost",
    "format_bytes",
    "load_config_file",
    "parse_keep_alive",
    "parse_memory_size",
    "parse_model_arg",
    "scan_models_dir",
]
