"""The app's configuration: frozen, built once from flags (or by the code that mounts the app)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from surge.app.db import default_database_url


def default_data_dir() -> Path:
    """Where the app keeps its data unless told (`--data-dir`): $XDG_DATA_HOME/surge, else
    ~/.local/share/surge; the same for `surge serve` and `surge app`."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "surge"


@dataclass(frozen=True)
class AppConfig:
    """Where the model service is, where the app keeps its data, and its limits.

    `database_url` defaults to SQLite under `data_dir`; a `postgresql+asyncpg://user@host/db`
    URL moves the store to a database server with no code change.
    """

    api_base: str = "http://127.0.0.1:8000/v1"  # the model service, OpenAI-compatible
    api_key: str | None = None  # sent as `Authorization: Bearer` to the model service
    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = None  # None: SQLite in data_dir
    signup_open: bool = True  # the first user can always sign up (and becomes admin)
    max_requests_per_minute: int = 120  # per user, on the app's own endpoints
    max_upload_bytes: int = 100 * 1024 * 1024  # an upload's body (all its files together)
    max_json_bytes: int = 1024 * 1024  # any other request's body
    secure_cookies: bool = False  # set behind HTTPS: cookies get the Secure flag
    session_ttl_s: float = 14 * 24 * 3600.0
    upstream_connect_timeout_s: float = 10.0
    upstream_read_timeout_s: float = 300.0  # the longest wait for the service's next bytes
    default_model: str | None = None  # None: the first chat model the service lists

    def __post_init__(self) -> None:
        if self.max_requests_per_minute < 1:
            raise ValueError("max_requests_per_minute must be at least 1")
        if self.max_upload_bytes < 1:
            raise ValueError("max_upload_bytes must be at least 1")
        if self.max_json_bytes < 1:
            raise ValueError("max_json_bytes must be at least 1")

    @property
    def store_url(self) -> str:
        """The database URL actually used."""
        return self.database_url or default_database_url(self.data_dir)
