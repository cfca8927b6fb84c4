"""Keys file parsing: every bad value fails at start-up, naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surge.config import ServerConfig
from surge.server.auth import KeyStore, hash_key
from surge.server.middleware import default_allowed_hosts, is_loopback


def store(tmp_path: Path, *lines: str) -> KeyStore:
    path = tmp_path / "keys.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return KeyStore.from_config(ServerConfig(api_keys_file=str(path)))


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"key": "k", "rpm": "60"}, "'rpm' must be a positive integer"),
        ({"key": "k", "rpm": 0}, "'rpm' must be a positive integer"),
        ({"key": "k", "tpm": -5}, "'tpm' must be a positive integer"),
        ({"key": "k", "max_concurrent": 1.5}, "'max_concurrent' must be a positive integer"),
        ({"key": "k", "max_concurrent": True}, "'max_concurrent' must be a positive integer"),
        ({"key": "k", "priority": "high"}, "'priority' must be an integer"),
        ({"key": "k", "name": 7}, "'name' must be a non-empty string"),
        ({"key": ""}, "must be a non-empty string"),
        ({"sha256": "abc"}, "64 hex digits"),
        ({"key": "k", "sha256": "0" * 64}, "exactly one of"),
        ({"key": "k", "rmp": 5}, "unknown fields ['rmp']"),
        ({"key": "k", "models": "chat"}, "'models' must be a list"),
    ],
)
def test_bad_entries_name_the_line(tmp_path: Path, entry: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as err:
        store(tmp_path, "# comment", "sk-fine", json.dumps(entry))
    assert "keys.jsonl:3: bad API key entry" in str(err.value) and message in str(err.value)


def test_good_entries(tmp_path: Path) -> None:
    keys = store(
        tmp_path,
        "sk-plain",
        json.dumps({"key": "sk-a", "rpm": 60, "priority": 2, "models": ["chat"]}),
        json.dumps({"sha256": hash_key("sk-b"), "name": "b", "tpm": None}),
    )
    a = keys.authenticate("Bearer sk-a")
    assert (a.rpm, a.priority, a.models) == (60, 2, ("chat",))
    assert keys.authenticate("Bearer sk-b").name == "b"
    assert keys.authenticate("Bearer sk-plain").models is None


def test_cli_keys_are_hashed_not_kept() -> None:
    config = ServerConfig(api_key_hashes=(hash_key("sk-cli"),))
    assert "sk-cli" not in repr(config)
    assert KeyStore.from_config(config).authenticate("Bearer sk-cli").name.startswith("key-")


def test_host_guard_defaults() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert default_allowed_hosts("127.0.0.1", api_is_open=True) is not None
    assert default_allowed_hosts("127.0.0.1", api_is_open=False) is None
    assert default_allowed_hosts("0.0.0.0", api_is_open=True) is None
