"""The app's store is the configured one: SQLite in the data dir by default, a database server
with `database_url` (a configuration change, no code change). The main flows run on both
stores in test_accounts, test_chat, test_kb_api and test_kb_followups (`pytestmark = STORES`)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest

from surge.app.db import LockKind
from tests.app.conftest import STORES, AppFactory
from tests.app.postgres import PG_PORT
from tests.app.servers import Browser, wait_for

pytestmark = STORES


def test_the_app_keeps_its_data_in_the_configured_store(
    store: str, make_app: AppFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    b = Browser(make_app())
    try:
        assert b.signup("alice").status_code == 201
        assert b.new_conversation(title="kept") > 0
    finally:
        b.close()
    query = (
        "SELECT u.username, u.role, c.title FROM users u JOIN conversations c ON c.user_id = u.id"
    )
    sqlite_file = tmp_path / "data0" / "surge-app.db"
    if store == "sqlite":
        with sqlite3.connect(sqlite_file) as db:
            rows = db.execute(query).fetchall()
    else:
        assert not sqlite_file.exists()  # nothing went to SQLite
        server = request.getfixturevalue("postgres")
        rows = server.fetch(server.last_database, query)
    assert rows == [("alice", "admin", "kept")]


def test_first_signups_in_several_processes_wait_for_one_lock(
    store: str, make_app: AppFactory, request: pytest.FixtureRequest
) -> None:
    """On PostgreSQL the first-user check takes an advisory lock every app process shares:
    while another holder (this test, standing in for a second process) has it, a sign-up
    waits on it (seen in pg_locks, not by timing), and goes on once it is released."""
    if store != "postgres":
        pytest.skip("SQLite: the app is one process (its asyncio lock is the whole story)")
    import asyncpg

    url = make_app()
    server = request.getfixturevalue("postgres")
    database = server.last_database
    key = (int(LockKind.SIGNUP), 0)
    loop = asyncio.new_event_loop()
    holder = loop.run_until_complete(
        asyncpg.connect(host=str(server.dir), port=PG_PORT, user="surge", database=database)
    )
    results: list[httpx.Response] = []
    b = Browser(url)
    try:
        loop.run_until_complete(holder.execute("SELECT pg_advisory_lock($1, $2)", *key))
        signup = threading.Thread(target=lambda: results.append(b.signup("alice")))
        signup.start()
        waiting = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            f" AND classid = {key[0]} AND objid = {key[1]}"
        )
        wait_for(lambda: server.fetch(database, waiting) == [(1,)], "the sign-up to wait")
        assert results == []
        loop.run_until_complete(holder.execute("SELECT pg_advisory_unlock($1, $2)", *key))
        signup.join(30)
        assert results[0].status_code == 201 and results[0].json()["user"]["role"] == "admin"
    finally:
        b.close()
        loop.run_until_complete(holder.close())
        loop.close()
