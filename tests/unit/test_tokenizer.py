"""The Tokenizer wrapper: local loading, EOS ids, chat templates, encode/decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surge.models.loader import load_model_files
from surge.tokenizer import Tokenizer
from tests.tiny_models import make_tiny_model_dir, make_tokenizer


@pytest.fixture(scope="module")
def smollm2(default_model_path: Path) -> Tokenizer:
    return Tokenizer.from_model_files(load_model_files(str(default_model_path)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-tok"))


def test_smollm2_eos_vocab_and_round_trip(smollm2: Tokenizer) -> None:
    assert 2 in smollm2.eos_token_ids  # <|im_end|>
    assert smollm2.vocab_size == 49152
    text = "Hello, world! 你好，世界！😀"
    ids = smollm2.encode(text)
    assert smollm2.decode(ids) == text


def test_smollm2_chat_template_comes_from_the_gguf(smollm2: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smollm2.apply_chat_template(messages)
    text = smollm2.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert smollm2.render_chat_template(messages) == text
    no_prompt = smollm2.apply_chat_template(messages, add_generation_prompt=False)
    assert ids[: len(no_prompt)] == no_prompt and len(no_prompt) < len(ids)


def test_special_tokens_are_skipped_on_request(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("Hi") + [2]
    assert smollm2.decode(ids) == "Hi"
    assert smollm2.decode(ids, skip_special_tokens=False) == "Hi<|im_end|>"


def test_hf_dir_eos_merges_generation_config(tiny_dir: Path) -> None:
    tok = Tokenizer.from_model_files(load_model_files(str(tiny_dir)))
    im_end = tok.hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    endoftext = tok.hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_ids == (im_end,)

    gen = tiny_dir / "generation_config.json"
    saved = gen.read_text() if gen.exists() else None
    try:
        gen.write_text(json.dumps({"eos_token_id": [im_end, endoftext]}))
        tok = Tokenizer.from_model_files(load_model_files(str(tiny_dir)))
        assert tok.eos_token_ids == (im_end, endoftext)
    finally:
        gen.unlink()
        if saved is not None:
            gen.write_text(saved)


def test_hf_dir_chat_template_and_bos_not_doubled(tiny_dir: Path) -> None:
    tok = Tokenizer.from_model_files(load_model_files(str(tiny_dir)))
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.vocab_size == len(tok.hf_tokenizer)


def test_no_chat_template_is_a_value_error(tmp_path: Path) -> None:
    hf = make_tokenizer()
    hf.chat_template = None
    tok = Tokenizer(hf, (hf.eos_token_id,), name="plain")
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
