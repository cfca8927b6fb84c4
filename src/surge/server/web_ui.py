"""The web app (surge.app) inside `surge serve`, at "/" (`--no-ui` leaves it out).

The app is a client of this server like any other: it calls `http://<this server>/v1` over HTTP
(DESIGN.md's rule), never the engine directly. Its key: API keys are kept only as hashes, so no
configured key can be handed to it; instead a random key is made at start-up, kept in memory
only, and its hash added to the key store as an internal key (`KeyStore.add_internal`). That key
works whether or not the API is open, and carries no rate limits: the app limits its own users
(per user) and counts their usage itself.

The app's pages and API (/, /static/..., /api/...) have their own log-in and body limits
(`surge.app.limits`: an upload may be far larger than --max-body-size), so the API-key check
and the server's body limit skip them; the server's routes (/v1/..., /health, /ready, /metrics, /docs) match first and keep
their own 404s and 405s.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from surge.app.config import AppConfig, default_data_dir
from surge.app.main import create_app, mount_app
from surge.config import ServerConfig
from surge.server.auth import KeyInfo, KeyStore, hash_key

INTERNAL_KEY_NAME = "surge-app"
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class UIConfig:
    """Where the web app keeps its data (users, conversations; SQLite unless `database_url`)."""

    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = None  # e.g. postgresql+asyncpg://user@host/surge
    secure_cookies: bool = False  # behind HTTPS
    max_upload_bytes: int = AppConfig.max_upload_bytes  # a knowledge-base upload's body


def internal_host(bind_host: str) -> str:
    """The host the app reaches this server at: loopback when it listens on every address."""
    if bind_host in _WILDCARD_HOSTS:
        return "127.0.0.1"
    return f"[{bind_host}]" if ":" in bind_host and not bind_host.startswith("[") else bind_host


def add_web_app(app: FastAPI, keys: KeyStore, config: ServerConfig, ui: UIConfig) -> None:
    """Mount the web app at "/" of `app`, with an internal key for this server's API."""
    key = secrets.token_urlsafe(32)
    keys.add_internal(hash_key(key), KeyInfo(INTERNAL_KEY_NAME, priority=config.default_priority))
    app_config = AppConfig(
        api_base=f"http://{internal_host(config.host)}:{config.port}/v1",
        api_key=key,
        data_dir=ui.data_dir,
        database_url=ui.database_url,
        secure_cookies=ui.secure_cookies,
        max_upload_bytes=ui.max_upload_bytes,
    )
    mount_app(app, create_app(app_config))
