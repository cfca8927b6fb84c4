"""Every architecture surge serves, planned from published config.json files alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surge.plan.arch import load_source
from surge.plan.devices import get_device
from surge.plan.planner import kv_shape, model_weights
from tests.plan.conftest import CONFIGS

# (file, surge class, parameters as published on the model cards / safetensors index,
#  KV bytes per token in bf16 = 2 (K,V) * layers * kv heads * head_dim * 2 bytes)
PUBLISHED = [
    ("glm-4-9b-chat.json", "GlmForCausalLM", 9_399_951_360, 2 * 40 * 2 * 128 * 2),
    ("glm-4-9b-chat-hf.json", "GlmForCausalLM", 9_399_951_360, 2 * 40 * 2 * 128 * 2),
    ("glm-4-9b-0414.json", "Glm4ForCausalLM", 9_400_279_040, 2 * 40 * 2 * 128 * 2),
    ("chatglm3-6b.json", "GlmForCausalLM", 6_243_584_000, 2 * 28 * 2 * 128 * 2),
    ("mistral-7b-instruct-v0.2.json", "MistralForCausalLM", 7_241_732_096, 2 * 32 * 8 * 128 * 2),
    ("mistral-7b-instruct-v0.3.json", "MistralForCausalLM", 7_248_023_552, 2 * 32 * 8 * 128 * 2),
    ("llama-3-8b-instruct.json", "LlamaForCausalLM", 8_030_261_248, 2 * 32 * 8 * 128 * 2),
    ("qwen2-7b-instruct.json", "Qwen2ForCausalLM", 7_615_616_512, 2 * 28 * 4 * 128 * 2),
    ("qwen3-8b.json", "Qwen3ForCausalLM", 8_190_735_360, 2 * 36 * 8 * 128 * 2),
]


@pytest.mark.parametrize(("name", "arch", "params", "kv_per_token"), PUBLISHED)
def test_published_configs(name: str, arch: str, params: int, kv_per_token: int) -> None:
    source = load_source(str(CONFIGS / name))
    assert source.architecture == arch
    weights = model_weights(source, get_device("rtx3090"), "bfloat16", "none")
    assert weights.num_params == params
    assert weights.weights_bytes == 2 * params  # bf16, untied, on a GPU: no packed copies
    s = kv_shape(source)
    assert 2 * s.num_layers * s.num_kv_heads * s.head_dim * 2 == kv_per_token


def test_every_registered_architecture_has_a_config() -> None:
    from surge.models.registry import ARCHITECTURES

    assert {arch for _, arch, _, _ in PUBLISHED} == set(ARCHITECTURES)


def test_chatglm_format_plans_like_its_transformers_conversion() -> None:
    """glm-4-9b-chat (remote code, ChatGLM names) and glm-4-9b-chat-hf: one model."""
    original = load_source(str(CONFIGS / "glm-4-9b-chat.json"))
    converted = load_source(str(CONFIGS / "glm-4-9b-chat-hf.json"))
    assert kv_shape(original) == kv_shape(converted)
    assert original.max_model_len == converted.max_model_len == 131072
    assert any("ChatGLM" in n for n in original.notes)


def test_model_directory_and_file(tmp_path: Path) -> None:
    """A directory with config.json and the config.json itself resolve alike, named by the dir."""
    model_dir = tmp_path / "Mistral-7B-Instruct-v0.2"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((CONFIGS / "mistral-7b-instruct-v0.2.json").read_text())
    by_dir, by_file = load_source(str(model_dir)), load_source(str(model_dir / "config.json"))
    assert by_dir.name == by_file.name == "Mistral-7B-Instruct-v0.2"
    assert kv_shape(by_dir) == kv_shape(by_file)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
        ({"hidden_size": 4}, "no model_type"),
        ([1, 2], "not a config.json object"),
    ],
)
def test_unsupported_configs(tmp_path: Path, content: object, match: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        load_source(str(path))


def test_missing_model() -> None:
    with pytest.raises(ValueError, match="not found"):
        load_source("/nonexistent/model")
