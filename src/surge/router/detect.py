"""Tell a model's kind from its files, and register every model found under `--models-dir`.

Only small JSON files and the GGUF magic are read; no weights, no torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from surge.encoders.kinds import detect_encoder_kind
from surge.router.spec import (
    BUNDLED_ALIASES,
    DEFAULT_KEEP_ALIVE_S,
    ModelKind,
    ModelSpec,
    is_gguf_file,
)

logger = logging.getLogger(__name__)

_CHAT_ARCH_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")
# model_type values of decoder configs that list no architectures
_CHAT_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "glm", "glm4", "gemma", "phi3"}
)


def detect_kind(path: str | Path) -> ModelKind:
    """The kind of the model at `path` (a .gguf file, an HF directory, or an alias); ValueError if unknown."""
    if str(path) in BUNDLED_ALIASES:
        return BUNDLED_ALIASES[str(path)]
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() == ".gguf" or is_gguf_file(p):
            return ModelKind.CHAT  # surge runs GGUF itself; the encoder workers can't read it
        raise ValueError(
            f"model file {str(p)!r} is not a GGUF file; pass a .gguf file or a directory"
        )
    if not p.is_dir():
        raise ValueError(f"model {str(path)!r} not found: not a directory, .gguf file, or alias")
    if not (p / "config.json").is_file():
        if len([g for g in p.glob("*.gguf") if g.is_file()]) == 1:
            return ModelKind.CHAT  # the loader takes a directory's only .gguf, so do we
        raise ValueError(
            f"model directory {str(p)!r} has no config.json and not exactly one .gguf file; "
            "cannot tell what model it is"
        )
    return _kind_from_hf_dir(p)


def _kind_from_hf_dir(p: Path) -> ModelKind:
    # the encoder workers' own rule first, so what it calls an encoder is one they will load:
    # sentence-transformers files or a *ForSequenceClassification head beat a causal-LM arch
    # (gte-Qwen2 is an embedding model on Qwen2ForCausalLM)
    encoder = detect_encoder_kind(p)
    if encoder is not None:
        return ModelKind(encoder)
    config = _read_json(p / "config.json")
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    model_type = config.get("model_type")
    if any(a.endswith(_CHAT_ARCH_SUFFIXES) for a in archs):
        return ModelKind.CHAT
    if not archs and model_type in _CHAT_MODEL_TYPES:
        return ModelKind.CHAT
    raise ValueError(
        f"cannot tell the kind of model {str(p)!r} (architectures {archs or 'none'}, model_type "
        f'{model_type!r}); set kind = "chat" | "embedding" | "rerank" for it in the config file'
    )


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object")
    return data


def scan_models_dir(
    directory: str | Path, keep_alive: float | None = DEFAULT_KEEP_ALIVE_S
) -> list[ModelSpec]:
    """Every model under `directory`, unloaded: subdirectories with a config.json or one .gguf,
    and *.gguf files; named by directory name / file stem; unreadable entries skipped with a warning.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ValueError(f"--models-dir {str(directory)!r} is not a directory")
    specs: dict[str, ModelSpec] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue  # partial downloads, .cache, editor files
        if entry.is_file() and entry.suffix.lower() != ".gguf":
            continue
        name = entry.stem if entry.is_file() else entry.name
        try:
            kind = detect_kind(entry)
        except (OSError, ValueError) as e:
            logger.warning("--models-dir: skipping %s: %s", entry, e)
            continue
        if name in specs:
            logger.warning(
                "--models-dir: skipping %s: the name %r is taken by %s",
                entry,
                name,
                specs[name].path,
            )
            continue
        specs[name] = ModelSpec(name=name, path=str(entry), kind=kind, keep_alive=keep_alive)
    logger.info("--models-dir %s: %d models registered", root, len(specs))
    return list(specs.values())
