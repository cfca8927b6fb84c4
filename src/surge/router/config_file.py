"""`surge serve --config surge.toml`: per-model settings, and merging with `--model`/`--models-dir`.

The file format::

    [defaults]                  # optional; applies to every model (from any source)
    keep_alive = "5m"           # Ollama's keep_alive: "5m", "1h30m", 300 (s), 0 (unload after
                                #   each request), -1 (forever); default "5m"
    memory_budget = "8GiB"      # loaded models' total estimated cost; "8GiB", "8GB", or bytes;
                                #   absent = no budget
    kv_cache_memory = "1GiB"    # any EngineConfig field: a default engine option for every model
                                #   (sizes only where the field is a byte count, see _SIZE_OPTIONS)

    [models.qwen]               # the table name is the model name clients use
    path = "/models/qwen2.5-0.5b"   # HF directory, .gguf file, or bundled alias; required;
                                    #   relative paths are relative to this file
    kind = "chat"               # optional: "chat" | "embedding" | "rerank"; detected otherwise
    keep_alive = -1             # optional; [defaults] keep_alive otherwise
    pinned = true               # optional: never expired, never evicted; default false
    replicas = 1                # optional; default 1
    min_replicas = 0            # optional, surge serve --ray only: this model's autoscaling
    max_replicas = 4            #   bounds (default: --min-replicas / --max-replicas)
    max_num_seqs = 64           # engine options by EngineConfig field name; win over [defaults]

Any other key, in any table, is a ValueError naming the file, the table and the key.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from surge.router.detect import detect_kind, scan_models_dir
from surge.router.spec import (
    BUNDLED_ALIASES,
    DEFAULT_KEEP_ALIVE_S,
    ENGINE_OPTION_NAMES,
    EngineOptionValue,
    ModelKind,
    ModelSpec,
    parse_keep_alive,
    parse_memory_size,
    parse_model_arg,
    validate_engine_options,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - tomli is a dependency on 3.10 only
    import tomli as tomllib

logger = logging.getLogger(__name__)

_DEFAULTS_KEYS = frozenset({"keep_alive", "memory_budget"})
_MODEL_KEYS = frozenset(
    {"path", "kind", "keep_alive", "pinned", "replicas", "min_replicas", "max_replicas"}
)
_SIZE_OPTIONS = frozenset({"kv_cache_memory"})  # engine options that also take "1GiB"


@dataclass(frozen=True)
class ConfigDefaults:
    """The `[defaults]` table: what every model gets unless its own table says otherwise."""

    keep_alive: float | None = DEFAULT_KEEP_ALIVE_S
    memory_budget: int | None = None  # bytes; None = no budget
    engine_options: Mapping[str, EngineOptionValue] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )


@dataclass(frozen=True)
class ConfigFile:
    """A parsed config file: its defaults and its models, in file order."""

    defaults: ConfigDefaults
    models: tuple[ModelSpec, ...]


def load_config_file(path: str | Path) -> ConfigFile:
    """Read and validate a surge.toml (format in this module's docstring); ValueError if bad."""
    p = Path(path).expanduser()
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"cannot read config file {str(p)!r}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    for key in data:
        if key not in ("defaults", "models"):
            raise ValueError(
                f"{p}: unknown top-level key {key!r}; expected [defaults] and [models.NAME]"
            )
    defaults = _parse_defaults(p, _table(p, data, "defaults"))
    models = _table(p, data, "models")
    specs = tuple(
        _parse_model(p, name, _table(p, models, name, f"models.{name}"), defaults)
        for name in models
    )
    return ConfigFile(defaults=defaults, models=specs)


def _table(
    p: Path, data: Mapping[str, object], key: str, label: str | None = None
) -> dict[str, object]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{p}: [{label or key}] must be a table, got {value!r}")
    return value


def _parse_defaults(p: Path, table: dict[str, object]) -> ConfigDefaults:
    where = f"{p}: [defaults]"
    keep_alive = _keep_alive(where, table.get("keep_alive", DEFAULT_KEEP_ALIVE_S))
    budget = table.get("memory_budget")
    try:
        memory_budget = None if budget is None else parse_memory_size(budget)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"{where} memory_budget: {e}") from None
    options = _engine_options(where, table, _DEFAULTS_KEYS)
    return ConfigDefaults(keep_alive, memory_budget, MappingProxyType(options))


def _parse_model(
    p: Path, name: str, table: dict[str, object], defaults: ConfigDefaults
) -> ModelSpec:
    where = f"{p}: [models.{name}]"
    path = table.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError(f'{where} needs path = "..." (an HF directory, .gguf file, or alias)')
    path = _resolve_path(p, path)
    forced = table.get("kind")
    kinds = [k.value for k in ModelKind]
    if forced is not None and forced not in kinds:
        raise ValueError(f"{where} kind must be one of {', '.join(kinds)}, got {forced!r}")
    try:
        kind = ModelKind(forced) if forced is not None else detect_kind(path)
    except ValueError as e:
        raise ValueError(f"{where} kind: {e}") from None
    pinned = table.get("pinned", False)
    if not isinstance(pinned, bool):
        raise ValueError(f"{where} pinned must be true or false, got {pinned!r}")
    keep_alive = (
        _keep_alive(where, table["keep_alive"]) if "keep_alive" in table else defaults.keep_alive
    )
    options = {**defaults.engine_options, **_engine_options(where, table, _MODEL_KEYS)}
    try:
        return ModelSpec(
            name=name,
            path=path,
            kind=kind,
            keep_alive=keep_alive,
            pinned=pinned,
            engine_options=options,
            replicas=table.get("replicas", 1),  # type: ignore[arg-type]  # ModelSpec checks it
            min_replicas=table.get("min_replicas"),  # type: ignore[arg-type]
            max_replicas=table.get("max_replicas"),  # type: ignore[arg-type]
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _resolve_path(config_path: Path, path: str) -> str:
    """Aliases as written; relative paths against the config file's directory, like includes."""
    if path in BUNDLED_ALIASES:
        return path
    resolved = Path(path).expanduser()
    return str(resolved if resolved.is_absolute() else config_path.parent / resolved)


def _keep_alive(where: str, value: object) -> float | None:
    try:
        return parse_keep_alive(value)  # type: ignore[arg-type]  # it rejects other types itself
    except ValueError as e:
        raise ValueError(f"{where} keep_alive: {e}") from None


def _engine_options(
    where: str, table: dict[str, object], own_keys: frozenset[str]
) -> dict[str, EngineOptionValue]:
    options: dict[str, EngineOptionValue] = {}
    for key, value in table.items():
        if key in own_keys:
            continue
        if key not in ENGINE_OPTION_NAMES:
            known = (
                ", ".join(sorted(own_keys))
                + ", or an engine option ("
                + ", ".join(sorted(ENGINE_OPTION_NAMES))
                + ")"
            )
            raise ValueError(f"{where}: unknown key {key!r}; expected {known}")
        if key in _SIZE_OPTIONS and isinstance(value, str):
            try:
                value = parse_memory_size(value)
            except ValueError as e:
                raise ValueError(f"{where} {key}: {e}") from None
        if not isinstance(value, (int, float, str, bool)):
            raise ValueError(
                f"{where}: engine option {key} = {value!r} must be a number, string or boolean"
            )
        options[key] = value
    validate_engine_options(options, where)
    return options


def collect_specs(
    model_args: Iterable[str] = (),
    models_dir: str | Path | None = None,
    config: ConfigFile | None = None,
) -> list[ModelSpec]:
    """Every model of `--model` args, `--config` and `--models-dir`, in that order, defaults applied.

    A name given twice by `--model`, or by both `--model` and the config file, is a ValueError;
    an explicit model (either) replaces a `--models-dir` one of the same name.
    """
    defaults = config.defaults if config is not None else ConfigDefaults()
    explicit: dict[str, ModelSpec] = {}
    for arg in model_args:
        name, path = parse_model_arg(arg)
        if name in explicit:
            raise ValueError(f"--model: the model name {name!r} is given twice")
        try:
            kind = detect_kind(path)
        except ValueError as e:
            raise ValueError(f"--model {arg!r}: {e}") from None
        explicit[name] = ModelSpec(
            name, path, kind, defaults.keep_alive, engine_options=defaults.engine_options
        )
    for spec in config.models if config is not None else ():
        if spec.name in explicit:
            raise ValueError(f"model {spec.name!r} is defined by both --model and the config file")
        explicit[spec.name] = spec
    scanned = [] if models_dir is None else scan_models_dir(models_dir, defaults.keep_alive)
    for spec in scanned:
        if spec.name in explicit:
            logger.info(
                "--models-dir: %r is also given explicitly; using %s",
                spec.name,
                explicit[spec.name].path,
            )
    extra = [
        dataclasses.replace(s, engine_options=defaults.engine_options)
        for s in scanned
        if s.name not in explicit
    ]
    return [*explicit.values(), *extra]
