"""A throw-away PostgreSQL server for the app's tests: Debian's binaries
(`/usr/lib/postgresql/N/bin`, installed with apt-get when missing), a cluster made by initdb in
a temp dir, listening only on a unix socket in that dir (no TCP port), stopped by its PID.

PostgreSQL refuses to run as root: as root the cluster belongs to `nobody` and the server runs
as that user (`setpriv`, which execs, so the PID is the server's). Where no server can be had
the tests that need one skip and say why."""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.app.servers import wait_for
from tests.support.apt import apt_install

PG_PORT = 5432  # only names the socket file: the server listens on no TCP port
STOP_TIMEOUT_S = 30


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    return Path(found[-1]).parent if found else None


def _major(path: str) -> int:
    version = Path(path).parent.parent.name
    return int(version) if version.isdigit() else 0


def _drop_root() -> list[str]:
    """The command prefix that runs a program as `nobody` when we are root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is missing: PostgreSQL won't run as root")
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


class PostgresServer:
    """One PostgreSQL cluster; `new_database()` gives each test a fresh database."""

    def __init__(self) -> None:
        bin_dir = pg_bin()
        if bin_dir is None:
            problem = apt_install("postgresql")
            bin_dir = pg_bin()
            if bin_dir is None:
                pytest.skip(f"no PostgreSQL binaries and they can't be installed: {problem}")
        self.dir = Path(tempfile.mkdtemp(prefix="surge-pg-"))  # short: a socket path is <108
        self.data = self.dir / "data"
        prefix = _drop_root()
        if prefix:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
        initdb = [str(bin_dir / "initdb"), "-D", str(self.data), "-U", "surge", "--auth=trust"]
        result = subprocess.run(
            [*prefix, *initdb, "--no-sync", "-E", "UTF8", "--locale=C"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            pytest.skip(f"initdb failed: {result.stderr.strip()[-500:]}")
        self.log = open(self.dir / "server.log", "wb")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [
                *prefix,
                str(bin_dir / "postgres"),
                *("-D", str(self.data), "-k", str(self.dir), "-p", str(PG_PORT)),
                *("-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=200"),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.num_databases = 0
        self.last_database = ""
        try:
            wait_for(self._ready, "PostgreSQL to accept connections", timeout=60)
        except AssertionError:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            log = (self.dir / "server.log").read_text(errors="replace")[-1000:]
            raise AssertionError(f"PostgreSQL exited: {log}")
        return (self.dir / f".s.PGSQL.{PG_PORT}").exists() and self._execute("SELECT 1")

    def _execute(self, sql: str) -> bool:
        import asyncpg

        try:
            self.fetch("postgres", sql)
        except (OSError, asyncpg.PostgresError):
            return False
        return True

    def fetch(self, database: str, sql: str) -> list[tuple[object, ...]]:
        """The rows `sql` gives in `database`."""
        import asyncpg

        async def run() -> list[tuple[object, ...]]:
            conn = await asyncpg.connect(
                host=str(self.dir), port=PG_PORT, user="surge", database=database
            )
            try:
                return [tuple(row) for row in await conn.fetch(sql)]
            finally:
                await conn.close()

        return asyncio.run(run())

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of `database` (over the unix socket)."""
        return f"postgresql+asyncpg://surge@/{database}?host={self.dir}&port={PG_PORT}"

    def new_database(self) -> str:
        """A new empty database; its URL (its name is `last_database`)."""
        self.num_databases += 1
        self.last_database = f"app{self.num_databases}"
        if not self._execute(f"CREATE DATABASE {self.last_database}"):
            raise AssertionError(f"CREATE DATABASE {self.last_database} failed")
        return self.url(self.last_database)

    def stop(self) -> None:
        """Fast shutdown (SIGINT) by PID, then the cluster's files go."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
