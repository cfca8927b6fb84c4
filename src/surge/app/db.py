"""The app's own store: SQLAlchemy 2 (async). SQLite under --data-dir by default; another
database URL (e.g. postgresql+asyncpg://user@host/surge) moves it to a database server with no
code change. Every table of the app derives from `Base`."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    """The declarative base of every app table."""


def default_database_url(data_dir: Path) -> str:
    """SQLite in the data directory."""
    return f"sqlite+aiosqlite:///{(data_dir / 'surge-app.db').resolve()}"


def make_engine(url: str) -> AsyncEngine:
    """An async engine; SQLite gets WAL (readers don't block the writer) and foreign keys."""
    engine = create_async_engine(url, pool_pre_ping=True)
    if url.startswith("sqlite"):

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

    return engine


def make_sessions(engine: AsyncEngine) -> async_sessionmaker:  # type: ignore[type-arg]
    """The session factory the app's routes and jobs use."""
    return async_sessionmaker(engine, expire_on_commit=False)


async def create_schema(engine: AsyncEngine) -> None:
    """Create every table that doesn't exist yet (a migration tool takes over once it must)."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


class LockKind(enum.IntEnum):
    """What a `store_lock` guards (the first half of its PostgreSQL advisory-lock key)."""

    SIGNUP = 0x5347  # the first sign-up becomes the admin: one at a time
    FILES_KB = 0x4642  # a conversation's hidden files knowledge base is made once


@asynccontextmanager
async def store_lock(
    db: AsyncSession, local: asyncio.Lock, kind: LockKind, object_id: int = 0
) -> AsyncIterator[None]:
    """Mutual exclusion for a check-then-insert: `local` among this process's requests and,
    when the store is PostgreSQL, a transaction-level advisory lock on (kind, object_id) among
    every app process sharing the database. The advisory lock is held until `db`'s transaction
    ends (commit or rollback), so the insert it guards commits under it. On SQLite the app is
    one process (the file's lock serializes writers, not check-then-insert)."""
    async with local:
        if db.get_bind().dialect.name == "postgresql":
            await db.execute(
                text("SELECT pg_advisory_xact_lock(:kind, :object_id)"),
                {"kind": int(kind), "object_id": object_id},
            )
        yield
