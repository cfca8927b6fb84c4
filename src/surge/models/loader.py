"""Find a model's files and stream its weights under HF parameter names: safetensors dirs and GGUF."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

from surge.models.default_model import DEFAULT_MODEL_NAME, pull_default_model
from surge.models.quant import (
    QuantizedTensor,
    check_method,
    gguf_stays_quantized,
    kernel_can_take,
    quantize,
)

logger = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"
_DEFAULT_MAX_MODEL_LEN = 2048

# GGUF architecture -> (HF model_type, HF architecture, whether llama.cpp permuted Q/K rows).
_GGUF_ARCHES: dict[str, tuple[str, str, bool]] = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}
_GGUF_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Tensors llama.cpp stores that HF models recompute; safe to drop.
_GGUF_IGNORED = re.compile(r"^blk\.\d+\.attn_rot_embd$")
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GGUF_TOP_RE = re.compile(r"^(\w+)\.(weight|bias)$")


@dataclass(frozen=True)
class ModelFiles:
    """What the engine needs to build a model: where it is, its kind, its HF config and context length."""

    path: Path  # an HF directory, or the .gguf file itself
    is_gguf: bool
    hf_config: PretrainedConfig
    max_model_len: int


def resolve_model_path(model: str | None) -> Path:
    """Turn `--model` into a local path: None = the default model, else an HF dir or a .gguf file."""
    if model is None or model == DEFAULT_MODEL_NAME:
        return pull_default_model()
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        found = f"{len(ggufs)} .gguf files" if ggufs else "no config.json and no .gguf file"
        raise FileNotFoundError(
            f"model directory {str(path)!r} has {found}; expected an HF directory with "
            "config.json + *.safetensors, or exactly one .gguf file"
        )
    if path.is_file():
        if _is_gguf_file(path):
            return path
        raise ValueError(
            f"model file {str(path)!r} is not a GGUF file; pass a .gguf file or an HF model directory"
        )
    raise FileNotFoundError(
        f"model {model!r} not found: it is not a local directory or .gguf file. surge never "
        "downloads from a model hub; download the model first, or omit --model for the default"
    )


def _is_gguf_file(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == _GGUF_MAGIC


def load_model_files(model: str | None) -> ModelFiles:
    """Resolve `model` and read its config (no weights yet)."""
    path = resolve_model_path(model)
    if path.is_file():
        config = _gguf_config(open_gguf(path))
        is_gguf = True
    else:
        _safetensors_files(path)  # fail now, before a model is built, if there are no weights
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        is_gguf = False
    return ModelFiles(
        path=path, is_gguf=is_gguf, hf_config=config, max_model_len=_max_model_len(config)
    )


def _max_model_len(config: PretrainedConfig) -> int:
    for key in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    logger.warning("model config names no context length; assuming %d", _DEFAULT_MAX_MODEL_LEN)
    return _DEFAULT_MAX_MODEL_LEN


def iter_weights(
    files: ModelFiles, dtype: torch.dtype, quantization: str = "none"
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Yield (HF parameter name, tensor in `dtype`) one at a time, so peak memory stays ~one tensor.

    quantization (`resolve_quantization`'s answer): "none", every tensor in dtype; "gguf", a GGUF's
    matrices in a format the kernels read stay as stored (QuantizedTensor); "int8" / "int4", an
    HF checkpoint's linear weights quantized at load (the embedding and output matrix to Q8_0).
    """
    if files.is_gguf:
        yield from _iter_gguf_weights(files, dtype, keep_quantized=quantization == "gguf")
        return
    for name, tensor in _iter_safetensors_weights(files.path, dtype):
        if quantization in ("int8", "int4") and _is_matrix(name):
            method = quantization if name.endswith("_proj.weight") else "int8"
            quantized = quantize(tensor, method)
            if quantized is not None:
                yield name, quantized
                continue
        yield name, tensor


def _is_matrix(name: str) -> bool:
    """A linear's or the embedding's weight: what can be kept quantized."""
    return name.endswith(("_proj.weight", "lm_head.weight", "embed_tokens.weight"))


def resolve_quantization(
    method: str, files: ModelFiles, dtype: torch.dtype, has_kernels: bool
) -> str:
    """What `iter_weights` should do for --quantization `method` (models/quant.py's methods).

    gguf keeps a GGUF's quantized matrices (they need the CPU kernels and a bf16 or float32
    model: float32 where the CPU has no native bf16); auto does so in a float32 model, and in a
    bf16 one for a GGUF whose bf16 copy would take KEEP_QUANTIZED_MIN_BYTES or more, dequantizing
    a smaller one (faster under concurrent load); int8/int4 quantize an HF checkpoint. Each
    choice is logged.
    """
    check_method(method)
    if method == "none":
        return "none"
    usable = has_kernels and dtype in (torch.bfloat16, torch.float32)
    why = "the CPU kernels are off" if not has_kernels else f"the model runs in {dtype}"
    if method == "auto":
        if not files.is_gguf:
            return "none"
        if not usable:
            logger.warning("GGUF weights dequantized to %s at load: %s", dtype, why)
            return "none"
        if dtype == torch.float32:
            # a CPU without native bf16: float32 dense linears stream 8x a Q4 file's bytes and
            # are no faster in batches than the int8 kernels (BENCHMARKS.md, the AVX2 EPYC)
            logger.info("GGUF weights kept quantized (a float32 model: no native bf16 here)")
            return "gguf"
        bf16_bytes = gguf_bf16_bytes(files.path)
        keep = gguf_stays_quantized(method, bf16_bytes)
        logger.info(
            "GGUF weights %s: their bf16 copy would take %.0f MiB (--quantization gguf|none)",
            "kept quantized" if keep else "dequantized to bf16 (faster under concurrent load)",
            bf16_bytes / 2**20,
        )
        return "gguf" if keep else "none"
    if method == "gguf" and not files.is_gguf:
        raise ValueError("--quantization gguf: the model is not a GGUF file (int8 or int4 are)")
    if method != "gguf" and files.is_gguf:
        raise ValueError(f"--quantization {method}: a GGUF is quantized already (use gguf or none)")
    if not usable:
        raise ValueError(
            f"--quantization {method} needs bfloat16 or float32 and the CPU kernels: {why}"
        )
    return method


def gguf_bf16_bytes(path: Path) -> int:
    """Bytes a GGUF file's tensors would take dequantized to bf16."""
    return 2 * sum(int(t.n_elements) for t in open_gguf(path).tensors)


# --- HF safetensors directories ---------------------------------------------------------------


def _safetensors_files(directory: Path) -> list[Path]:
    # The index names the real shards; a bare glob could also pick up e.g. a consolidated copy.
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {str(directory)!r}; surge loads safetensors or GGUF only"
        )
    return files


def _iter_safetensors_weights(
    directory: Path, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in _safetensors_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # recomputed by the model; old checkpoints still carry it
                yield name, f.get_tensor(name).to(dtype)


# --- GGUF files ----------------------------------------------------------------------------------


def open_gguf(path: Path):  # -> gguf.GGUFReader (untyped: gguf ships no stubs)
    """Open a GGUF file (memory-mapped; parsing the metadata takes ~1 s for a big vocabulary)."""
    import gguf

    return gguf.GGUFReader(str(path))


def gguf_field(reader, key: str, default=None):
    """One metadata value of an open GGUF file as a Python value, or `default` when absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _gguf_arch(reader) -> str:
    arch = gguf_field(reader, "general.architecture")
    if arch not in _GGUF_ARCHES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(_GGUF_ARCHES)})"
        )
    return arch


def _gguf_config(reader) -> PretrainedConfig:
    """Build the HF config from GGUF metadata (faster than transformers' path, and no tokenizer parse)."""
    arch = _gguf_arch(reader)

    def meta(key: str, default=None):
        return gguf_field(reader, f"{arch}.{key}", default)

    scaling = meta("rope.scaling.type", "none")
    tensor_names = {t.name for t in reader.tensors}
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"this GGUF uses rope scaling (type {scaling!r} or a rope_freqs tensor), which surge "
            "does not read from GGUF; use the model's HF directory instead"
        )
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    num_heads = int(meta("attention.head_count"))
    hidden_size = int(meta("embedding_length"))
    model_type, hf_arch, _ = _GGUF_ARCHES[arch]
    kwargs = dict(
        architectures=[hf_arch],
        vocab_size=int(embd.shape[1]),  # GGUF shapes are reversed: [hidden, vocab]
        hidden_size=hidden_size,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=int(meta("attention.key_length", hidden_size // num_heads)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(meta("context_length", _DEFAULT_MAX_MODEL_LEN)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_gguf_eos_ids(reader),
    )
    if arch == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return AutoConfig.for_model(model_type, **kwargs)


def _gguf_eos_ids(reader) -> int | list[int] | None:
    """EOS plus end-of-turn/-message ids: Llama 3 style GGUFs end a chat turn with those."""
    keys = ("eos", "eot", "eom")
    found = [gguf_field(reader, f"tokenizer.ggml.{key}_token_id") for key in keys]
    ids = list(dict.fromkeys(int(i) for i in found if i is not None))
    return ids[0] if len(ids) == 1 else (ids or None)


def _gguf_hf_name(gguf_name: str) -> str | None:
    """Map a GGUF tensor name to its HF name; None for tensors HF models do not keep."""
    if m := _GGUF_LAYER_RE.match(gguf_name):
        layer, part, kind = m.groups()
        if part in _GGUF_LAYER_NAMES:
            return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"
    elif m := _GGUF_TOP_RE.match(gguf_name):
        part, kind = m.groups()
        if part in _GGUF_TOP_NAMES:
            return f"{_GGUF_TOP_NAMES[part]}.{kind}"
    if _GGUF_IGNORED.match(gguf_name.removesuffix(".weight")):
        return None
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}; this model variant is not supported")


def _reverse_qk_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf `permute`, which interleaves each head's rotary halves."""
    head_dim = weight.shape[0] // num_heads
    return (
        weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def _dequantize(tensor) -> torch.Tensor:
    """One GGUF tensor as float32 torch, in HF shape (GGUF lists dims innermost first)."""
    from gguf.quants import dequantize

    array = dequantize(tensor.data, tensor.tensor_type)
    if array.dtype != np.float32 or not array.flags.writeable:
        array = array.astype(np.float32)  # memmapped F32 tensors are read-only views of the file
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return torch.from_numpy(array).reshape(shape)


def _iter_gguf_weights(
    files: ModelFiles, dtype: torch.dtype, keep_quantized: bool
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    reader = open_gguf(files.path)
    permuted = _GGUF_ARCHES[_gguf_arch(reader)][2]
    config = files.hf_config
    for tensor in reader.tensors:
        name = _gguf_hf_name(tensor.name)
        if name is None:
            continue
        heads = None
        if permuted and ".self_attn.q_proj." in name:
            heads = config.num_attention_heads
        elif permuted and ".self_attn.k_proj." in name:
            heads = config.num_key_value_heads
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        qtype = int(tensor.tensor_type)
        if keep_quantized and _is_matrix(name) and kernel_can_take(qtype, shape):
            # the file's bytes, copied out of the memory map: rows of blocks, as stored
            weight = QuantizedTensor.from_gguf(qtype, np.asarray(tensor.data), (shape[0], shape[1]))
            if heads is not None and name.endswith(".weight"):
                order = _reverse_qk_permute(torch.arange(shape[0]), heads)
                weight = weight.permute_rows(order)
            yield name, weight
            continue
        weight = _dequantize(tensor)
        if heads is not None:
            weight = _reverse_qk_permute(weight, heads)
        yield name, weight.to(dtype)
