"""Model specs and where they come from: keep_alive, --model, kind detection, --models-dir, surge.toml."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from surge.config import EngineConfig
from surge.encoders import DEFAULT_EMBEDDING_MODEL_NAME
from surge.models.default_model import DEFAULT_MODEL_NAME
from surge.router import (
    DEFAULT_KEEP_ALIVE_S,
    ModelKind,
    ModelSpec,
    collect_specs,
    detect_kind,
    load_config_file,
    parse_keep_alive,
    parse_memory_size,
    parse_model_arg,
    scan_models_dir,
)

# ---- keep_alive, sizes, --model ----


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("300ms", 0.3),
        ("10s", 10.0),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("+5m", 300.0),
        ("2h45m30s", 9930.0),
        ("1us", 1e-6),
        ("1µs", 1e-6),
        ("0", 0.0),
        ("0s", 0.0),
        ("300", 300.0),  # a bare number string is seconds, as OLLAMA_KEEP_ALIVE reads it
        (0, 0.0),
        (300, 300.0),
        (2.5, 2.5),
        (-1, None),
        (-0.5, None),
        ("-1m", None),
        ("-1", None),
        (float("inf"), None),
    ],
)
def test_parse_keep_alive(value: str | int | float, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["", "abc", "5x", "1h 30m", "m", "-", "5 minutes", "nan", "1d"])
def test_parse_keep_alive_rejects_bad_strings_naming_them(value: str) -> None:
    with pytest.raises(ValueError, match=f"invalid keep_alive {value!r}"):
        parse_keep_alive(value)


@pytest.mark.parametrize("value", [True, None, float("nan"), [5]])
def test_parse_keep_alive_rejects_bad_types(value: object) -> None:
    with pytest.raises(ValueError, match="invalid keep_alive"):
        parse_keep_alive(value)  # type: ignore[arg-type]


def test_parse_memory_size() -> None:
    assert parse_memory_size("8GiB") == 8 * 1024**3
    assert parse_memory_size("8GB") == parse_memory_size("8g") == 8 * 10**9
    assert parse_memory_size("512MiB") == 512 * 1024**2
    assert parse_memory_size("1.5 GiB") == int(1.5 * 1024**3)
    assert parse_memory_size(4096) == parse_memory_size("4096") == parse_memory_size("4KiB")
    for bad in ("", "lots", "0", "-1GiB", "8XB", 0, True):
        with pytest.raises(ValueError, match="invalid memory size"):
            parse_memory_size(bad)  # type: ignore[arg-type]


def test_parse_model_arg() -> None:
    assert parse_model_arg("qwen=/models/qwen2.5") == ("qwen", "/models/qwen2.5")
    assert parse_model_arg("/models/qwen2.5") == ("qwen2.5", "/models/qwen2.5")
    assert parse_model_arg("/models/smol.Q4.gguf") == ("smol.Q4", "/models/smol.Q4.gguf")
    assert parse_model_arg("/data/a=b/model") == ("model", "/data/a=b/model")  # "=" in a path
    assert parse_model_arg(DEFAULT_MODEL_NAME) == (DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME)
    assert parse_model_arg(f"smol={DEFAULT_MODEL_NAME}") == ("smol", DEFAULT_MODEL_NAME)
    with pytest.raises(ValueError, match="no path"):
        parse_model_arg("qwen=")


# ---- ModelSpec ----


def test_spec_validates_engine_options_against_engine_config() -> None:
    ok = ModelSpec(
        "a", "/m", ModelKind.CHAT, engine_options={"max_num_seqs": 8, "dtype": "float32"}
    )
    config = ok.engine_config(EngineConfig(max_num_batched_tokens=64))
    assert (config.model, config.max_num_seqs, config.dtype) == ("/m", 8, "float32")
    assert config.max_num_batched_tokens == 64  # the base's value where the spec says nothing
    bad: list[tuple[dict[str, object], str]] = [
        ({"max_num_sequences": 8}, "unknown engine option 'max_num_sequences'"),
        ({"model": "/other"}, "unknown engine option 'model'"),
        ({"max_num_seqs": "8"}, "max_num_seqs='8' must be int"),
        ({"max_num_seqs": True}, "must be int"),
        ({"enable_prefix_caching": 1}, "must be bool"),
        ({"block_size": 12}, "power of two"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            ModelSpec("a", "/m", ModelKind.CHAT, engine_options=options)  # type: ignore[arg-type]


def test_spec_is_frozen_including_its_options() -> None:
    options = {"max_num_seqs": 8}
    spec = ModelSpec("a", "/m", ModelKind.CHAT, engine_options=options)
    options["max_num_seqs"] = 9
    assert spec.engine_options["max_num_seqs"] == 8
    with pytest.raises(TypeError):
        spec.engine_options["max_num_seqs"] = 9  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "non-empty"),
        ({"name": " a"}, "non-empty"),
        ({"replicas": 0}, "replicas"),
        ({"replicas": 1.5}, "replicas"),
        ({"keep_alive": -1.0}, "keep_alive"),
        ({"min_replicas": -1}, "min_replicas"),
        ({"max_replicas": 0}, "max_replicas"),
        ({"max_replicas": True}, "max_replicas"),
        ({"min_replicas": 3, "max_replicas": 2}, "above its max_replicas"),
    ],
)
def test_spec_rejects_bad_fields(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"name": "a", "path": "/m", "kind": ModelKind.CHAT, **kwargs}
    with pytest.raises(ValueError, match=message):
        ModelSpec(**fields)  # type: ignore[arg-type]


# ---- detect_kind ----


def hf_dir(root: Path, name: str, config: dict[str, object], *extra: str) -> Path:
    """A model directory with just config.json and empty marker files (no weights)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    for filename in extra:
        (d / filename).write_text("{}" if filename.endswith(".json") else "")
    return d


def gguf_file(path: Path) -> Path:
    path.write_bytes(b"GGUF" + bytes(16))
    return path


def test_detect_kind_of_each_layout(tmp_path: Path) -> None:
    cases = {
        hf_dir(tmp_path, "qwen", {"architectures": ["Qwen2ForCausalLM"]}): ModelKind.CHAT,
        hf_dir(tmp_path, "gemma3", {"architectures": ["Gemma3ForConditionalGeneration"]}): (
            ModelKind.CHAT
        ),
        hf_dir(tmp_path, "gpt2", {"architectures": ["GPT2LMHeadModel"]}): ModelKind.CHAT,
        hf_dir(tmp_path, "llama-notarch", {"model_type": "llama"}): ModelKind.CHAT,
        hf_dir(
            tmp_path,
            "minilm",
            {"architectures": ["BertModel"], "model_type": "bert"},
            "modules.json",
        ): (ModelKind.EMBEDDING),
        hf_dir(
            tmp_path,
            "old-st",
            {"architectures": ["BertModel"], "model_type": "bert"},
            "sentence_bert_config.json",
        ): (ModelKind.EMBEDDING),
        # an embedding model on a causal-LM architecture: the sentence-transformers files decide
        hf_dir(tmp_path, "gte-qwen", {"architectures": ["Qwen2ForCausalLM"]}, "modules.json"): (
            ModelKind.EMBEDDING
        ),
        hf_dir(
            tmp_path, "bge", {"architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta"}
        ): ModelKind.EMBEDDING,
        hf_dir(tmp_path, "reranker", {"architectures": ["XLMRobertaForSequenceClassification"]}): (
            ModelKind.RERANK
        ),
        gguf_file(tmp_path / "smol.gguf"): ModelKind.CHAT,
    }
    ce = hf_dir(
        tmp_path, "cross", {"architectures": ["BertModel"], "model_type": "bert"}, "modules.json"
    )
    (ce / "config_sentence_transformers.json").write_text(
        json.dumps({"model_type": "CrossEncoder"})
    )
    cases[ce] = ModelKind.RERANK
    one_gguf = tmp_path / "wrapped"
    one_gguf.mkdir()
    gguf_file(one_gguf / "model.gguf")
    cases[one_gguf] = ModelKind.CHAT
    for path, kind in cases.items():
        assert detect_kind(path) is kind, path
    assert detect_kind(DEFAULT_MODEL_NAME) is ModelKind.CHAT
    assert detect_kind(DEFAULT_EMBEDDING_MODEL_NAME) is ModelKind.EMBEDDING
    assert detect_kind(str(tmp_path / "qwen")) is ModelKind.CHAT


def test_detect_kind_errors_are_clear(tmp_path: Path) -> None:
    unknown = hf_dir(tmp_path, "mystery", {"architectures": ["WhisperForAudioClassification"]})
    with pytest.raises(ValueError, match=r"cannot tell the kind.*set kind = "):
        detect_kind(unknown)
    # a decoder's bare base model is no embedding model by itself (the encoder workers' rule)
    with pytest.raises(ValueError, match="cannot tell the kind"):
        detect_kind(
            hf_dir(tmp_path, "base", {"architectures": ["LlamaModel"], "model_type": "llama"})
        )
    with pytest.raises(ValueError, match="not found"):
        detect_kind(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        detect_kind(broken)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a GGUF file"):
        detect_kind(tmp_path / "notes.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        detect_kind(empty)


# ---- --models-dir ----


def test_scan_models_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hf_dir(tmp_path, "qwen", {"architectures": ["Qwen2ForCausalLM"]})
    hf_dir(
        tmp_path, "minilm", {"architectures": ["BertModel"], "model_type": "bert"}, "modules.json"
    )
    hf_dir(tmp_path, "mystery", {"architectures": ["SomethingElse"]})
    hf_dir(tmp_path, ".cache", {"architectures": ["Qwen2ForCausalLM"]})
    gguf_file(tmp_path / "smol.gguf")
    gguf_file(tmp_path / "qwen.gguf")  # same name as the directory: the first (sorted) wins
    (tmp_path / "README.md").write_text("not a model")
    with caplog.at_level(logging.WARNING):
        specs = scan_models_dir(tmp_path, keep_alive=60.0)
    assert [(s.name, s.kind) for s in specs] == [
        ("minilm", ModelKind.EMBEDDING),
        ("qwen", ModelKind.CHAT),
        ("smol", ModelKind.CHAT),
    ]
    assert specs[1].path == str(tmp_path / "qwen")
    assert all(s.keep_alive == 60.0 and not s.pinned for s in specs)
    assert "mystery" in caplog.text and "qwen.gguf" in caplog.text
    with pytest.raises(ValueError, match="not a directory"):
        scan_models_dir(tmp_path / "nope")


# ---- surge.toml ----

GOOD_CONFIG = """
[defaults]
keep_alive = "10m"
memory_budget = "8GiB"
kv_cache_memory = "1GiB"

[models.qwen]
path = "/models/qwen2.5-0.5b"
kind = "chat"
keep_alive = -1
pinned = true
max_num_seqs = 64

[models.embed]
path = "minilm"
replicas = 2
min_replicas = 0
max_replicas = 3
kv_cache_memory = 1024
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "surge.toml"
    path.write_text(text)
    return path


def test_load_config_file(tmp_path: Path) -> None:
    hf_dir(
        tmp_path, "minilm", {"architectures": ["BertModel"], "model_type": "bert"}, "modules.json"
    )
    config = load_config_file(write(tmp_path, GOOD_CONFIG))
    assert config.defaults.keep_alive == 600.0
    assert config.defaults.memory_budget == 8 * 1024**3
    assert dict(config.defaults.engine_options) == {"kv_cache_memory": 1024**3}
    qwen, embed = config.models
    assert (qwen.name, qwen.path, qwen.kind) == ("qwen", "/models/qwen2.5-0.5b", ModelKind.CHAT)
    assert qwen.keep_alive is None and qwen.pinned and qwen.replicas == 1
    assert dict(qwen.engine_options) == {"kv_cache_memory": 1024**3, "max_num_seqs": 64}
    # relative to the file, kind detected, defaults applied, own options win
    assert embed.path == str(tmp_path / "minilm") and embed.kind is ModelKind.EMBEDDING
    assert embed.keep_alive == 600.0 and not embed.pinned and embed.replicas == 2
    assert (embed.min_replicas, embed.max_replicas) == (0, 3)  # Ray Serve's bounds
    assert (qwen.min_replicas, qwen.max_replicas) == (None, None)  # the flags'
    assert dict(embed.engine_options) == {"kv_cache_memory": 1024}


def test_config_file_defaults_when_empty(tmp_path: Path) -> None:
    config = load_config_file(write(tmp_path, ""))
    assert config.models == ()
    assert config.defaults.keep_alive == DEFAULT_KEEP_ALIVE_S
    assert config.defaults.memory_budget is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = 1", r"unknown top-level key 'server'"),
        ("models = 3", r"\[models\] must be a table"),
        ("[defaults]\npinned = true", r"\[defaults\]: unknown key 'pinned'"),
        ("[defaults]\nkeep_alive = 'soon'", r"\[defaults\] keep_alive: invalid keep_alive 'soon'"),
        ("[defaults]\nmemory_budget = 'lots'", r"\[defaults\] memory_budget: invalid memory size"),
        ("[defaults]\nmax_num_seqs = 'many'", r"\[defaults\]: engine option max_num_seqs"),
        (
            "[models.a]\npath = '/m'\nkind = 'chat'\nkeepalive = 1",
            r"\[models.a\]: unknown key 'keepalive'",
        ),
        (
            "[models.a]\npath = '/m'\nkind = 'vision'",
            r"\[models.a\] kind must be one of chat, embedding, rerank, got 'vision'",
        ),
        ("[models.a]\nkind = 'chat'", r"\[models.a\] needs path"),
        ("[models.a]\npath = '/m'\nkind = 'chat'\npinned = 'yes'", r"\[models.a\] pinned must be"),
        (
            "[models.a]\npath = '/m'\nkind = 'chat'\nkeep_alive = '5 min'",
            r"\[models.a\] keep_alive",
        ),
        ("[models.a]\npath = '/m'\nkind = 'chat'\nreplicas = 0", r"\[models.a\]: replicas"),
        ("[models.a]\npath = '/m'\nkind = 'chat'\nblock_size = 3", r"\[models.a\]: .*power of two"),
        (
            "[models.a]\npath = '/m'\nkind = 'chat'\nmax_num_seqs = [1]",
            r"\[models.a\]: engine option",
        ),
        ("[models.a]\npath = '/nonexistent/model'", r"\[models.a\] kind: model .* not found"),
        ("[models]\na = 1", r"\[models.a\] must be a table"),
        ("[models.a\npath = 1", r"is not valid TOML"),
    ],
)
def test_config_file_errors_name_file_table_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as err:
        load_config_file(path)
    assert str(path) in str(err.value)


def test_config_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read config file"):
        load_config_file(tmp_path / "absent.toml")


# ---- merging the sources ----


def test_collect_specs_merges_model_args_config_and_models_dir(tmp_path: Path) -> None:
    models = tmp_path / "models"
    hf_dir(models, "qwen", {"architectures": ["Qwen2ForCausalLM"]})
    hf_dir(models, "minilm", {"architectures": ["BertModel"], "model_type": "bert"}, "modules.json")
    gguf_file(models / "smol.gguf")
    config = load_config_file(
        write(
            tmp_path,
            f'[defaults]\nkeep_alive = "1m"\nmax_num_seqs = 4\n[models.qwen]\npath = "{models / "qwen"}"\npinned = true\n',
        )
    )
    specs = collect_specs([f"tiny={models / 'smol.gguf'}"], models, config)
    by_name = {s.name: s for s in specs}
    assert [s.name for s in specs] == ["tiny", "qwen", "minilm", "smol"]
    assert by_name["qwen"].pinned  # the config's qwen replaces the scanned one
    assert all(s.keep_alive == 60.0 for s in specs)
    assert all(s.engine_options["max_num_seqs"] == 4 for s in specs)
    assert by_name["minilm"].kind is ModelKind.EMBEDDING


def test_collect_specs_rejects_duplicates(tmp_path: Path) -> None:
    gguf_file(tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="'a' is given twice"):
        collect_specs([str(tmp_path / "a.gguf"), f"a={tmp_path / 'a.gguf'}"])
    config = load_config_file(write(tmp_path, f'[models.a]\npath = "{tmp_path / "a.gguf"}"\n'))
    with pytest.raises(ValueError, match="both --model and the config file"):
        collect_specs([str(tmp_path / "a.gguf")], config=config)
    with pytest.raises(ValueError, match="--model '/nope/x'"):
        collect_specs(["/nope/x"])
    assert [s.name for s in collect_specs()] == []
