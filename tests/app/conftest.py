"""The app's fixtures: one fake model service per module, a fresh app (and store) per test.

The store is SQLite in the test's temp dir; a module that also runs on PostgreSQL sets
`pytestmark = STORES` (each of its tests then runs on both: a throw-away server per test
session, a new database per app, tests/app/postgres.py)."""

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
from tests.app.postgres import PostgresServer
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
STORES = pytest.mark.parametrize("store", ["sqlite", "postgres"], indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session, started when a test first needs it."""
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def store(request: pytest.FixtureRequest) -> str:
    """The app's store: "sqlite" unless the module parametrizes it (STORES)."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def new_database_url(store: str, request: pytest.FixtureRequest) -> Callable[[], str | None]:
    """A fresh store for each app a test starts: None (SQLite in its data dir) or a new
    PostgreSQL database."""
    if store == "sqlite":
        return lambda: None
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database


@pytest.fixture
def make_app(
    fake: FakeUpstream,
    tmp_path: Path,
    clock: FakeClock,
    new_database_url: Callable[[], str | None],
) -> Iterator[AppFactory]:
    """Start the app against the fake service (config fields overridable); its base URL."""
    servers: list[ServerThread] = []

    def start(**overrides: object) -> str:
        config = AppConfig(
            api_base=f"{fake.base_url}/v1",
            api_key="upstream-key",
            data_dir=tmp_path / f"data{len(servers)}",
            database_url=new_database_url(),
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
