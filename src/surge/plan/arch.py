"""MODEL (a config.json, an HF directory, a GGUF file or a bundled name) -> the HF config surge
would build, without reading any weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from surge.models.default_model import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_NAME,
    _installed_package_file,
    default_cache_dir,
)
from surge.models.registry import model_class

_GGUF_MAGIC = b"GGUF"
# The bundled chat model's shape (SmolLM2-135M-Instruct's published config.json), so it can be
# planned before `surge pull` fetched its GGUF; once fetched, the GGUF itself is read.
_BUNDLED_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}
# ChatGLM's own (remote-code) config names -> transformers' GLM names
_CHATGLM_ARCHES = {"ChatGLMModel", "ChatGLMForConditionalGeneration"}


@dataclass(frozen=True)
class ModelSource:
    """What `surge plan` knows about a model: its HF config and, for a GGUF, the file."""

    name: str
    hf_config: PretrainedConfig
    architecture: str  # the surge model class that serves it
    max_model_len: int
    gguf_path: Path | None = None
    notes: tuple[str, ...] = ()


def load_source(model: str | None) -> ModelSource:
    """Resolve MODEL like `surge serve` does, but read only configs and GGUF metadata."""
    if model is None or model == DEFAULT_MODEL_NAME:
        gguf = _bundled_gguf()
        if gguf is not None:
            return _from_gguf(gguf, DEFAULT_MODEL_NAME)
        note = "the bundled model is not fetched yet: its shape is its published config's"
        return _from_dict(dict(_BUNDLED_CONFIG), DEFAULT_MODEL_NAME, (note,))
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _from_json(path / "config.json", path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _from_gguf(ggufs[0], path.name)
        raise ValueError(f"{model!r} has no config.json and not exactly one .gguf file")
    if path.is_file():
        with path.open("rb") as f:
            is_gguf = f.read(4) == _GGUF_MAGIC
        return _from_gguf(path, path.stem) if is_gguf else _from_json(path, _json_name(path))
    raise ValueError(
        f"model {model!r} not found: pass a config.json, an HF model directory, a .gguf file "
        f"or {DEFAULT_MODEL_NAME!r}"
    )


def _bundled_gguf() -> Path | None:
    """The bundled GGUF where `surge serve` would find it, without fetching it."""
    installed = _installed_package_file()
    if installed is not None:
        return installed
    cached = default_cache_dir() / DEFAULT_MODEL_FILE
    return cached if cached.is_file() else None


def _json_name(path: Path) -> str:
    return path.parent.name if path.name == "config.json" else path.stem


def _from_json(path: Path, name: str) -> ModelSource:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a readable config.json: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} is not a config.json object")
    return _from_dict(data, name, ())


def _from_dict(data: dict[str, Any], name: str, notes: tuple[str, ...]) -> ModelSource:
    archs = set(data.get("architectures") or [])
    if data.get("model_type") == "chatglm" or archs & _CHATGLM_ARCHES:
        data = chatglm_to_glm(data)
        notes += (
            "ChatGLM's own (remote-code) config: planned as GlmForCausalLM, the transformers "
            "format surge loads (e.g. THUDM/glm-4-9b-chat-hf); same shape",
        )
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"config of {name!r} has no model_type")
    data.pop("auto_map", None)  # remote code is never run
    try:
        config = AutoConfig.for_model(model_type, **data)
    except ValueError as e:
        raise ValueError(f"config of {name!r}: {e}") from e
    return _source(name, config, None, notes)


def chatglm_to_glm(data: dict[str, Any]) -> dict[str, Any]:
    """A ChatGLM2/3 / GLM-4 (`model_type: chatglm`) config in transformers' GLM names."""
    heads = int(data["num_attention_heads"])
    hidden = int(data["hidden_size"])
    kv_heads = int(data["multi_query_group_num"]) if data.get("multi_query_attention") else heads
    return {
        "model_type": "glm",
        "architectures": ["GlmForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(data["ffn_hidden_size"]),
        "num_hidden_layers": int(data.get("num_layers") or data["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(data.get("kv_channels") or hidden // heads),
        "vocab_size": int(data.get("padded_vocab_size") or data["vocab_size"]),
        "max_position_embeddings": int(data.get("seq_length") or 2048),
        "partial_rotary_factor": 0.5,  # ChatGLM rotates half of each head
        "rope_theta": 10000.0 * float(data.get("rope_ratio", 1.0)),
        "attention_bias": bool(data.get("add_qkv_bias", True)),
        "rms_norm_eps": float(data.get("layernorm_epsilon", 1e-5)),
        "tie_word_embeddings": bool(data.get("tie_word_embeddings", False)),
        # GlmConfig's defaults are GLM-4's ids, past ChatGLM3's vocabulary: take the file's
        **{k: data[k] for k in ("pad_token_id", "eos_token_id", "bos_token_id") if k in data},
    }


def _from_gguf(path: Path, name: str) -> ModelSource:
    # the loader's own GGUF -> HF config mapping (metadata only; the tensors stay mapped)
    from surge.models.loader import load_model_files

    files = load_model_files(str(path))
    return _source(name, files.hf_config, path, ())


def _source(
    name: str, config: PretrainedConfig, gguf: Path | None, notes: tuple[str, ...]
) -> ModelSource:
    cls = model_class(config)  # ValueError for an architecture surge does not serve
    return ModelSource(
        name=name,
        hf_config=config,
        architecture=cls.__name__,
        max_model_len=_max_model_len(config),
        gguf_path=gguf,
        notes=notes,
    )


def _max_model_len(config: PretrainedConfig) -> int:
    # the loader's rule (loader._max_model_len), which the engine caps max_model_len at
    from surge.models.loader import _max_model_len as loader_max_model_len

    return loader_max_model_len(config)
