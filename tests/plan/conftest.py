"""Plan fixtures: the published configs kept beside the tests, and a tiny random model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model_dir

CONFIGS = Path(__file__).parent / "configs"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with the tiny tokenizer (real safetensors, for the engine)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("plan-tiny-llama"))
