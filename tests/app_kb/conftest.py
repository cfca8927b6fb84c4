"""Shared helpers for the knowledge-base tests: a store in a temp dir, a model-free embedder."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from surge.app.db import create_schema, make_engine, make_sessions

FAKE_DIM = 64
_FAKE_TOKENS = re.compile(r"[\u4e00-\u9fff]|[a-z0-9-]+")


def fake_vectors(texts: list[str]) -> np.ndarray:
    """Hashed bags of words and Chinese characters, normalized: texts sharing words get
    similar vectors (cheap: no segmenter)."""
    vectors = np.zeros((len(texts), FAKE_DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        for token in _FAKE_TOKENS.findall(text.lower()) or ["<empty>"]:
            vectors[row, zlib.crc32(token.encode()) % FAKE_DIM] += 1.0
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


async def fake_embed(texts: list[str]) -> np.ndarray:
    return fake_vectors(texts)


async def open_store(data_dir: Path):  # type: ignore[no-untyped-def]
    """An engine and session factory over a fresh SQLite file with every table."""
    engine = make_engine(f"sqlite+aiosqlite:///{data_dir / 'kb.db'}")
    await create_schema(engine)
    return engine, make_sessions(engine)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path
