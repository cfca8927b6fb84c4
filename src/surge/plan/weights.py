"""Bytes of a model's weights as surge's engine holds them, counted on a weightless (meta) build.

The model is built by the engine's own registry on the `meta` device, so every parameter the
engine allocates (fused QKV, biases, q/k norms, an untied lm_head) is counted and none is
invented. Quantized sizes use the kernels' own row layout (models/quant.py `row_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from surge.models.quant import gguf_stays_quantized, kernel_can_take, row_bytes
from surge.models.registry import create_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_Q8_0, _Q4_1 = 8, 3
_METHOD_QTYPE = {"int8": _Q8_0, "int4": _Q4_1}  # what --quantization quantizes linears to


@dataclass(frozen=True)
class WeightsEstimate:
    """What the weights cost in memory and what one decode step reads and computes."""

    num_params: int
    weights_bytes: int  # held in memory once loaded
    streamed_bytes: int  # read by every decode step (all but an untied embedding table's rows)
    matmul_params: int  # multiply-adds per token in the linears, lm_head included
    quantization: str  # what the engine would do: none, gguf, int8, int4


def _is_matrix(name: str) -> bool:
    # the loader's rule (loader._is_matrix): what --quantization int8/int4 quantizes
    return name.endswith(("_proj.weight", "lm_head.weight", "embed_tokens.weight"))


def _param_bytes(name: str, shape: tuple[int, ...], dtype_bytes: int, quantization: str) -> int:
    numel = 1
    for d in shape:
        numel *= d
    if quantization in _METHOD_QTYPE and len(shape) == 2 and _is_matrix(name):
        # linears take the method's format, the embedding and lm_head Q8_0 (loader.iter_weights)
        qtype = _METHOD_QTYPE[quantization] if name.endswith("_proj.weight") else _Q8_0
        per_row = row_bytes(qtype, shape[1])
        if per_row:
            return shape[0] * per_row
    return numel * dtype_bytes


def hf_weights(
    hf_config: PretrainedConfig, dtype: str, quantization: str, packed_cpu: bool
) -> WeightsEstimate:
    """Weights of an HF-format model; `packed_cpu`: bf16 on CPU, where a tied embedding gets a
    second, packed copy for the logits (LlamaForCausalLM.pack_weights)."""
    model = create_model(hf_config, _DTYPES[dtype], "meta")
    dtype_bytes = _DTYPES[dtype].itemsize
    tied = model.lm_head is None
    total = streamed = num_params = matmul = 0
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        size = _param_bytes(name, shape, dtype_bytes, quantization)
        num_params += p.numel()
        total += size
        is_embedding = name.endswith("embed_tokens.weight")
        if not is_embedding or tied:  # an untied table is only looked up, B rows a step
            streamed += size
        if len(shape) == 2 and (not is_embedding or tied):
            matmul += p.numel()
    if tied and packed_cpu and quantization == "none":
        embed = model.model.embed_tokens.weight
        total += embed.numel() * dtype_bytes
    return WeightsEstimate(num_params, total, streamed, matmul, quantization)


def gguf_weights(path: Path, dtype: str, quantization: str, cpu_kernels: bool) -> WeightsEstimate:
    """Weights of a GGUF as the engine loads it: matrices the CPU kernels take stay quantized
    where `--quantization` keeps them (bf16 on CPU), everything else dequantized to `dtype`."""
    from surge.models.loader import open_gguf

    reader = open_gguf(path)
    dtype_bytes = _DTYPES[dtype].itemsize
    bf16_bytes = 2 * sum(int(t.n_elements) for t in reader.tensors)
    usable = cpu_kernels and dtype == "bfloat16"  # loader.resolve_quantization's condition
    keep = usable and gguf_stays_quantized(quantization, bf16_bytes)
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    total = streamed = num_params = matmul = 0
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        numel = int(t.n_elements)
        qtype = int(t.tensor_type)
        if keep and _gguf_is_matrix(t.name) and kernel_can_take(qtype, shape):
            size = shape[0] * row_bytes(qtype, shape[1])
        else:
            size = numel * dtype_bytes
        num_params += numel
        total += size
        is_embedding = t.name == "token_embd.weight"
        if not is_embedding or tied:
            streamed += size
        if len(shape) == 2 and (not is_embedding or tied):
            matmul += numel
    if tied and not keep and usable:  # the packed bf16 copy for the logits, as above
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        total += int(embd.n_elements) * dtype_bytes
    return WeightsEstimate(num_params, total, streamed, matmul, "gguf" if keep else "none")


def _gguf_is_matrix(name: str) -> bool:
    # GGUF names of the matrices the loader keeps quantized (its _is_matrix after renaming)
    return name in ("token_embd.weight", "output.weight") or (
        name.startswith("blk.") and name.endswith(".weight") and "norm" not in name
    )
