"""The app's own store: SQLAlchemy 2 (async). SQLite under --data-dir by default; another
database URL (e.g. postgresql+asyncpg://user@host/surge) moves it to a database server with no
code change. Every table of the app derives from `Base`."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
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
