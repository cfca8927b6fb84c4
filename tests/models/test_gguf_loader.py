"""The default GGUF's dequantized weights, loaded into transformers' own Llama, give real answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from surge.models.loader import iter_weights, load_model_files
from surge.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


def test_smollm2_gguf_in_transformers_says_paris(default_model_path: Path) -> None:
    files = load_model_files(str(default_model_path))
    assert files.is_gguf and files.max_model_len == 8192
    assert files.hf_config.tie_word_embeddings
    model = LlamaForCausalLM(files.hf_config).eval()
    result = model.load_state_dict(dict(iter_weights(files, torch.float32)), strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()

    tokenizer = Tokenizer.from_model_files(files)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, len(prompt) :].tolist())
    assert "Paris" in text
