"""The app's store is the configured one: SQLite in the data dir by default, a database server
with `database_url` (a configuration change, no code change). The main flows run on both
stores in test_accounts, test_chat, test_kb_api and test_kb_followups (`pytestmark = STORES`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.app.conftest import STORES, AppFactory
from tests.app.servers import Browser

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
