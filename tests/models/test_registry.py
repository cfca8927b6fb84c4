"""Building models by architecture name, and loading weights by HF name."""

from __future__ import annotations

import pytest
import torch

from surge.models.registry import ARCHITECTURES, create_model

from .paged_helpers import hf_config, load_pair


def test_unsupported_architecture_is_a_clear_error() -> None:
    config = hf_config("llama")
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="unsupported architecture"):
        create_model(config, torch.float32, "cpu")


def test_model_interface_attributes() -> None:
    config = hf_config("qwen3")
    model = create_model(config, torch.bfloat16, "cpu")
    assert type(model) is ARCHITECTURES["Qwen3ForCausalLM"]
    assert (model.num_layers, model.num_kv_heads, model.head_dim, model.vocab_size) == (
        2,
        2,
        32,
        256,
    )
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_unknown_and_missing_weights_raise() -> None:
    hf, ours = load_pair("qwen2")
    state = hf.state_dict()
    with pytest.raises(ValueError, match="unknown weight"):
        ours.load_weights([*state.items(), ("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    del state["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="missing"):
        ours.load_weights(state.items())
