"""detect_encoder_kind on embedding, rerank and other model directories."""

from __future__ import annotations

import json
from pathlib import Path

from surge.encoders import detect_encoder_kind


def _write(path: Path, name: str, data: object) -> None:
    (path / name).parent.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(data))


def test_sentence_transformers_dir_is_embedding(minilm_dir: Path) -> None:
    assert detect_encoder_kind(minilm_dir) == "embedding"


def test_bare_encoder_base_model_is_embedding(tiny_embedding_dir: Path) -> None:
    assert detect_encoder_kind(tiny_embedding_dir) == "embedding"


def test_sequence_classification_is_rerank(tiny_reranker_dir: Path) -> None:
    assert detect_encoder_kind(str(tiny_reranker_dir)) == "rerank"


def test_cross_encoder_saved_by_sentence_transformers_is_rerank(tmp_path: Path) -> None:
    # sentence-transformers >= 4 saves a CrossEncoder with modules.json, like an embedding model.
    _write(tmp_path, "config.json", {"architectures": ["XLMRobertaForSequenceClassification"]})
    _write(tmp_path, "modules.json", [{"idx": 0, "name": "0", "path": ""}])
    _write(tmp_path, "config_sentence_transformers.json", {"model_type": "CrossEncoder"})
    assert detect_encoder_kind(tmp_path) == "rerank"


def test_sentence_transformers_files_without_model_type(tmp_path: Path) -> None:
    _write(tmp_path, "config.json", {"architectures": ["MPNetModel"], "model_type": "mpnet"})
    _write(tmp_path, "sentence_bert_config.json", {"max_seq_length": 384})
    assert detect_encoder_kind(tmp_path) == "embedding"


def test_other_models_are_neither(tmp_path: Path) -> None:
    causal = tmp_path / "causal"
    causal.mkdir()
    _write(causal, "config.json", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    decoder_base = tmp_path / "decoder-base"
    decoder_base.mkdir()
    _write(decoder_base, "config.json", {"architectures": ["LlamaModel"], "model_type": "llama"})
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    _write(sparse, "modules.json", [])
    _write(sparse, "config_sentence_transformers.json", {"model_type": "SparseEncoder"})
    empty = tmp_path / "empty"
    empty.mkdir()
    for path in (causal, decoder_base, sparse, empty, tmp_path / "missing"):
        assert detect_encoder_kind(path) is None, path
    (tmp_path / "file.gguf").write_bytes(b"GGUF")
    assert detect_encoder_kind(tmp_path / "file.gguf") is None
