"""The app's fixtures: one fake model service per module, a fresh app (and store) per test."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from surge.app import security
from surge.app.config import AppConfig
from surge.app.main import create_app
from tests.app.browser import chromium, open_page  # noqa: F401 - the browser tests' fixtures
from tests.app.fake_upstream import FakeUpstream
from tests.app.servers import Browser, ServerThread


@pytest.fixture(scope="session", autouse=True)
def real_hasher() -> Iterator[PasswordHasher]:
    """The app's password hasher, replaced meanwhile by argon2id with small parameters: the
    tests hash dozens of passwords on a shared CPU (test_parts checks the real one)."""
    real = security._hasher
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(security, "_hasher", PasswordHasher(1, 8192, 1))
        mp.setattr(security, "_dummy_hash", None)
        yield real


class FakeClock:
    """The rate limiter's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream()
    server = ServerThread(upstream.app)
    upstream.base_url = server.base_url
    yield upstream
    server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


AppFactory = Callable[..., str]


@pytest.fixture
def make_app(fake: FakeUpstream, tmp_path: Path, clock: FakeClock) -> Iterator[AppFactory]:
    """Start the app against the fake service (config fields overridable); its base URL."""
    servers: list[ServerThread] = []

    def start(**overrides: object) -> str:
        config = AppConfig(
            api_base=f"{fake.base_url}/v1",
            api_key="upstream-key",
            data_dir=tmp_path / f"data{len(servers)}",
            upstream_read_timeout_s=30.0,
        )
        server = ServerThread(create_app(dataclasses.replace(config, **overrides), clock=clock))
        servers.append(server)
        return server.base_url

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def app_url(make_app: AppFactory) -> str:
    return make_app()


@pytest.fixture
def browsers(app_url: str) -> Iterator[Callable[[], Browser]]:
    """New browsers against the app (closed at the end)."""
    opened: list[Browser] = []

    def new() -> Browser:
        opened.append(Browser(app_url))
        return opened[-1]

    yield new
    for b in opened:
        b.close()


@pytest.fixture
def admin(browsers: Callable[[], Browser]) -> Browser:
    """The first user, who is the admin."""
    b = browsers()
    assert b.signup("alice").status_code == 201
    return b
