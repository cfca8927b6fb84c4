"""Memory cost estimates on small fake model files, and the eviction rule."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from surge.config import EngineConfig
from surge.encoders import DEFAULT_EMBEDDING_MODEL_NAME
from surge.models.default_model import DEFAULT_MODEL_NAME
from surge.router import (
    EvictionCandidate,
    ModelCost,
    ModelKind,
    ModelSpec,
    choose_evictions,
    estimate_cost,
    format_bytes,
)
from surge.router.memory import ENCODER_BATCH_BUFFER_BYTES

GiB = 1024**3
KV = EngineConfig().kv_cache_memory


def write_gguf(path: Path) -> int:
    """A tiny llama GGUF: one F32 tensor and one Q8_0 tensor; returns its element count."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((10, 64), dtype=np.float32))
    quantized = gguf.quants.quantize(
        np.ones((64, 256), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    writer.add_tensor("blk.0.attn_q.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return 10 * 64 + 64 * 256


def chat(path: Path | str, **options: object) -> ModelSpec:
    return ModelSpec("m", str(path), ModelKind.CHAT, engine_options=options)  # type: ignore[arg-type]


def test_gguf_costs_its_dequantized_size_plus_the_kv_cache(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    elements = write_gguf(path)
    bf16 = estimate_cost(chat(path, dtype="bfloat16"))
    assert bf16 == ModelCost(weights_bytes=elements * 2, cache_bytes=KV)
    assert bf16.total_bytes == elements * 2 + KV
    assert estimate_cost(chat(path, dtype="float32")).weights_bytes == elements * 4
    assert estimate_cost(chat(path)).weights_bytes == elements * 2  # "auto" is estimated as bf16
    assert estimate_cost(chat(path), auto_dtype_bytes=4).weights_bytes == elements * 4
    # Q8_0 is ~1 byte per element on disk: dequantized to fp32 it takes ~4x that in memory
    assert estimate_cost(chat(path, dtype="float32")).weights_bytes > 3 * path.stat().st_size
    # a directory holding one .gguf is that file, as the loader reads it
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    write_gguf(wrapped / "model.gguf")
    assert estimate_cost(chat(wrapped)).weights_bytes == elements * 2


def test_kv_cache_from_engine_options_and_base_config(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    assert estimate_cost(chat(path, kv_cache_memory=GiB)).cache_bytes == GiB
    base = EngineConfig(kv_cache_memory=3 * GiB)
    assert estimate_cost(chat(path), base).cache_bytes == 3 * GiB
    # num_kv_blocks: blocks * 2 (K and V) * layers * block_size * kv heads * head dim * dtype
    cost = estimate_cost(chat(path, num_kv_blocks=10, dtype="float32"))
    assert cost.cache_bytes == 10 * 2 * 2 * 16 * 2 * (64 // 4) * 4


def hf_chat_dir(tmp_path: Path) -> Path:
    d = tmp_path / "llama"
    d.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "hidden_size": 128,
    }
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_safetensors_count_elements_at_the_engine_dtype(tmp_path: Path) -> None:
    d = hf_chat_dir(tmp_path)
    save_file({"a": np.zeros((100, 10), np.float32)}, str(d / "model-00001.safetensors"))
    save_file({"b": np.zeros((50,), np.float16)}, str(d / "model-00002.safetensors"))
    (d / "pytorch_model.bin").write_bytes(bytes(999))  # ignored next to safetensors
    assert estimate_cost(chat(d, dtype="bfloat16")).weights_bytes == 1050 * 2
    assert estimate_cost(chat(d, dtype="float32")).weights_bytes == 1050 * 4
    cost = estimate_cost(chat(d, dtype="bfloat16", num_kv_blocks=4))
    assert cost.cache_bytes == 4 * 2 * 3 * 16 * 2 * (128 // 8) * 2


def test_bin_only_and_unreadable_safetensors_fall_back_to_file_sizes(tmp_path: Path) -> None:
    d = hf_chat_dir(tmp_path)
    (d / "pytorch_model.bin").write_bytes(bytes(1234))
    assert estimate_cost(chat(d)).weights_bytes == 1234
    (d / "model.safetensors").write_bytes(b"garbage! and more")  # a header length of 2**61
    assert estimate_cost(chat(d)).weights_bytes == 17


def test_missing_weights_or_path_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        estimate_cost(chat(hf_chat_dir(tmp_path)))
    with pytest.raises(ValueError, match="does not exist"):
        estimate_cost(chat(tmp_path / "gone"))
    with pytest.raises(ValueError, match="does not exist"):
        estimate_cost(ModelSpec("e", str(tmp_path / "gone"), ModelKind.EMBEDDING))


def test_bundled_aliases_not_yet_fetched_have_a_fixed_estimate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SURGE_CACHE", str(tmp_path))
    cost = estimate_cost(chat(DEFAULT_MODEL_NAME, dtype="bfloat16"))
    assert cost == ModelCost(135_000_000 * 2, KV)
    embed = ModelSpec("e", DEFAULT_EMBEDDING_MODEL_NAME, ModelKind.EMBEDDING)
    assert estimate_cost(embed) == ModelCost(91_000_000, ENCODER_BATCH_BUFFER_BYTES)


def test_encoders_cost_file_sizes_plus_a_batch_allowance(tmp_path: Path) -> None:
    d = tmp_path / "minilm"
    (d / "2_Dense").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (d / "model.safetensors").write_bytes(bytes(1000))
    (d / "2_Dense" / "model.safetensors").write_bytes(bytes(100))
    (d / "pytorch_model.bin").write_bytes(bytes(5000))  # the same weights again: not counted
    spec = ModelSpec("e", str(d), ModelKind.EMBEDDING)
    assert estimate_cost(spec) == ModelCost(1100, ENCODER_BATCH_BUFFER_BYTES)
    rerank = ModelSpec("r", str(d), ModelKind.RERANK, replicas=3)
    assert estimate_cost(rerank) == ModelCost(3 * 1100, 3 * ENCODER_BATCH_BUFFER_BYTES)


def test_replicas_multiply_the_cost(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    elements = write_gguf(path)
    spec = ModelSpec("m", str(path), ModelKind.CHAT, replicas=2)
    assert estimate_cost(spec) == ModelCost(2 * elements * 2, 2 * KV)


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(8 * GiB) == "8.0 GiB"
    assert format_bytes(3 * 1024 * GiB) == "3.0 TiB"


# ---- choose_evictions ----


def candidate(
    name: str, gib: int, last_used: float, pinned: bool = False, num_in_flight: int = 0
) -> EvictionCandidate:
    return EvictionCandidate(name, ModelCost(gib * GiB, 0), last_used, pinned, num_in_flight)


def test_nothing_to_evict_when_it_fits() -> None:
    assert choose_evictions([candidate("a", 2, 1.0)], 2 * GiB, 8 * GiB, 2 * GiB) == []


def test_evicts_least_recently_used_first_until_it_fits() -> None:
    models = [candidate("new", 1, 30.0), candidate("old", 1, 10.0), candidate("mid", 4, 20.0)]
    # 7 GiB of 8 in use, 3 more needed: the oldest (1 GiB) is not enough, then "mid" too
    assert choose_evictions(models, 3 * GiB, 8 * GiB, 7 * GiB) == ["old", "mid"]
    # size doesn't reorder: when 1 GiB is enough, the oldest goes, though "mid" is bigger
    assert choose_evictions(models, 3 * GiB, 8 * GiB, 6 * GiB) == ["old"]


def test_pinned_and_in_flight_models_are_skipped() -> None:
    models = [
        candidate("pinned", 4, 1.0, pinned=True),
        candidate("busy", 2, 2.0, num_in_flight=1),
        candidate("idle", 2, 3.0),
    ]
    assert choose_evictions(models, 2 * GiB, 8 * GiB, 8 * GiB) == ["idle"]
    assert choose_evictions(models, 4 * GiB, 8 * GiB, 8 * GiB) is None


def test_none_when_even_evicting_everything_is_not_enough() -> None:
    assert choose_evictions([candidate("a", 2, 1.0)], 9 * GiB, 8 * GiB, 2 * GiB) is None
    assert choose_evictions([], 1 * GiB, 8 * GiB, 8 * GiB) is None


def test_ties_go_to_the_bigger_model_then_the_name() -> None:
    models = [candidate("b", 1, 5.0), candidate("a", 1, 5.0), candidate("big", 3, 5.0)]
    assert choose_evictions(models, 1 * GiB, 8 * GiB, 8 * GiB) == ["big"]
    assert choose_evictions(models[:2], 1 * GiB, 8 * GiB, 8 * GiB) == ["a"]
