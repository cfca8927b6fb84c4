"""Bench fixtures: a tiny random model directory, shared by the module's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="session")
def bench_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with the tiny byte-level tokenizer (max_model_len 512)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("bench-tiny-llama"))
