"""Engine fixtures: one tiny random model directory per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with the tiny byte-level tokenizer."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))
