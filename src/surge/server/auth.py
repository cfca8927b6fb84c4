"""API keys: hashed at rest, compared in constant time; each key carries its limits and priority.

Keys come from `--api-key` (repeatable) and `--api-keys-file`. The file has one key per line;
blank lines and lines starting with `#` are skipped. A line is either the bare key, or a JSON
object with per-key settings (every field optional except one of `key` / `sha256`):

    {"key": "sk-team-a", "name": "team-a", "rpm": 60, "tpm": 20000, "max_concurrent": 4, "priority": 0}
    {"sha256": "<hex sha256 of the key>", "name": "batch-jobs", "priority": 10}

`sha256` lets the file hold no plain key at all. Fields left out take the server's defaults
(`--rate-limit-rpm`, `--rate-limit-tpm`, `--max-concurrent-per-key`, priority 0).
No key configured = the API is open, as in vLLM; every caller is then the key "anonymous".
A value of the wrong type, or a limit that is zero or negative, fails start-up naming the line.

A request's `priority` may be equal to or worse (higher) than its key's, never better: a key
can't jump the queue it was given.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from surge.config import ServerConfig
from surge.server.protocol import APIError


@dataclass(frozen=True)
class KeyInfo:
    """Who is calling and what they may do; `None` limits are unlimited."""

    name: str
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    priority: int = 0
    models: tuple[str, ...] | None = None  # the models this key may use; None = all


def hash_key(key: str) -> str:
    """The hex sha256 of a key: what we keep in memory instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Known key hashes and their settings."""

    def __init__(self, entries: list[tuple[str, KeyInfo]], anonymous: KeyInfo) -> None:
        self._entries = [(bytes.fromhex(h), info) for h, info in entries]
        self._internal: list[tuple[bytes, KeyInfo]] = []
        self.anonymous = anonymous

    def add_internal(self, key_hash: str, info: KeyInfo) -> None:
        """A key the server made for its own client (the web app): accepted even when the API is
        open, so that client never shares the anonymous limits, and it doesn't close an open
        API."""
        self._internal.append((bytes.fromhex(key_hash), info))

    @property
    def is_open(self) -> bool:
        """No keys configured: everyone is let in as `anonymous`."""
        return not self._entries

    @classmethod
    def from_config(cls, config: ServerConfig) -> KeyStore:
        """Keys of --api-key and --api-keys-file; ValueError on a malformed file line."""
        defaults = KeyInfo(
            name="anonymous",
            rpm=config.rate_limit_rpm,
            tpm=config.rate_limit_tpm,
            max_concurrent=config.max_concurrent_per_key,
            priority=config.default_priority,
        )
        entries = [(h, _with_name(defaults, f"key-{h[:8]}")) for h in config.api_key_hashes]
        if config.api_keys_file:
            text = Path(config.api_keys_file).read_text()
            for lineno, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    entries.append(_parse_line(line, defaults, f"{config.api_keys_file}:{lineno}"))
        return cls(entries, defaults)

    def authenticate(self, authorization: str | None) -> KeyInfo:
        """The caller of an `Authorization: Bearer KEY` header; APIError 401 if unknown."""
        if self._internal and authorization and authorization.lower().startswith("bearer "):
            digest = hashlib.sha256(authorization[7:].strip().encode()).digest()
            for stored, info in self._internal:
                if hmac.compare_digest(stored, digest):
                    return info
        if self.is_open:
            return self.anonymous
        if not authorization or not authorization.lower().startswith("bearer "):
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer YOUR_KEY'",
                type="authentication_error",
                code="invalid_api_key",
            )
        digest = hashlib.sha256(authorization[7:].strip().encode()).digest()
        found: KeyInfo | None = None
        # compare against every key so the time taken says nothing about which one was close
        for stored, info in self._entries:
            if hmac.compare_digest(stored, digest):
                found = info
        if found is None:
            raise APIError(
                401, "invalid API key", type="authentication_error", code="invalid_api_key"
            )
        return found


def _with_name(defaults: KeyInfo, name: str) -> KeyInfo:
    return KeyInfo(name, defaults.rpm, defaults.tpm, defaults.max_concurrent, defaults.priority)


def _parse_line(line: str, defaults: KeyInfo, where: str) -> tuple[str, KeyInfo]:
    """One keys-file line -> (sha256 hex, settings)."""
    if not line.startswith("{"):
        return hash_key(line), _with_name(defaults, f"key-{hash_key(line)[:8]}")
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        unknown = set(obj) - _FIELDS
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        if ("sha256" in obj) == ("key" in obj):
            raise ValueError("give exactly one of 'key' and 'sha256'")
        secret = obj.get("sha256", obj.get("key"))
        if not isinstance(secret, str) or not secret:
            raise ValueError("'key'/'sha256' must be a non-empty string")
        digest = secret.lower() if "sha256" in obj else hash_key(secret)
        if len(digest) != 64 or len(bytes.fromhex(digest)) != 32:
            raise ValueError("'sha256' must be 64 hex digits")
        name = obj.get("name", f"key-{digest[:8]}")
        if not isinstance(name, str) or not name:
            raise ValueError("'name' must be a non-empty string")
        priority = obj.get("priority", defaults.priority)
        if not _is_int(priority):
            raise ValueError("'priority' must be an integer")
        models = obj.get("models")
        if models is not None and not (
            isinstance(models, list) and all(isinstance(m, str) and m for m in models)
        ):
            raise ValueError("'models' must be a list of model names")
        info = KeyInfo(
            name=name,
            rpm=_limit(obj, "rpm", defaults.rpm),
            tpm=_limit(obj, "tpm", defaults.tpm),
            max_concurrent=_limit(obj, "max_concurrent", defaults.max_concurrent),
            priority=priority,
            models=None if models is None else tuple(models),
        )
    except ValueError as e:
        raise ValueError(f"{where}: bad API key entry: {e}") from e
    return digest, info


_FIELDS = {"key", "sha256", "name", "rpm", "tpm", "max_concurrent", "priority", "models"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _limit(obj: dict[str, object], field: str, default: int | None) -> int | None:
    """A per-key limit: a positive integer, or null for unlimited."""
    value = obj.get(field, default)
    if value is not None and not (_is_int(value) and value > 0):  # type: ignore[operator]
        raise ValueError(f"{field!r} must be a positive integer or null, got {value!r}")
    return value  # type: ignore[return-value]
