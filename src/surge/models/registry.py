"""HF architecture name -> model class, and building a model without a slow random init."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from surge.models.glm import Glm4ForCausalLM, GlmForCausalLM
from surge.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "GlmForCausalLM": GlmForCausalLM,
    "Glm4ForCausalLM": Glm4ForCausalLM,
}
# configs built in code (not read from config.json) may list no architectures
MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "glm": "GlmForCausalLM",
    "glm4": "Glm4ForCausalLM",
}


def model_class(hf_config: PretrainedConfig) -> type[nn.Module]:
    """The class for the config's architecture (or model_type); ValueError if unsupported."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs and getattr(hf_config, "model_type", None) in MODEL_TYPES:
        archs = [MODEL_TYPES[hf_config.model_type]]
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ValueError(
        f"unsupported architecture {archs or '(none in config)'}; "
        f"supported: {', '.join(sorted(ARCHITECTURES))}"
    )


def create_model(
    hf_config: PretrainedConfig, dtype: torch.dtype, device: torch.device | str
) -> nn.Module:
    """Build the model for hf_config with uninitialized weights in dtype on device, in eval mode.

    Parameters are created on the meta device and materialized with `to_empty`, so nothing is
    randomly initialized; call `load_weights` next. Buffers (rotary) are computed here.
    """
    cls = model_class(hf_config)
    with torch.device("meta"):
        model = cls(hf_config)
    model = model.to(dtype=dtype).to_empty(device=device)
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if reset is not None:
            reset()
    return model.eval()
