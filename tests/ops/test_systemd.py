"""deploy/systemd/surge.service: systemd accepts it, and its shutdown fits surge's."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ops.deploy import SYSTEMD_UNIT

INSTALLED_SURGE = "/opt/surge/venv/bin/surge"
DEFAULT_SHUTDOWN_GRACE_S = 30


def _setting(text: str, key: str) -> str:
    (value,) = re.findall(rf"^{key}=(.*)$", text, re.MULTILINE)
    return value


def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds no unknown or invalid setting (ExecStart pointed at a
    program that exists here)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze here")
    text = SYSTEMD_UNIT.read_text()
    assert INSTALLED_SURGE in text
    unit = tmp_path / "surge.service"
    unit.write_text(text.replace(INSTALLED_SURGE, shutil.which("surge") or sys.executable))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not re.search(r"Unknown|Invalid|Failed to parse|ignoring", output), output


def test_unit_shutdown_lets_requests_finish() -> None:
    """SIGTERM goes to the server only (its engine cores must keep serving while in-flight
    requests finish), and systemd waits longer than surge's shutdown grace."""
    text = SYSTEMD_UNIT.read_text()
    assert _setting(text, "KillMode") == "mixed"
    assert int(_setting(text, "TimeoutStopSec")) > DEFAULT_SHUTDOWN_GRACE_S
    assert re.search(r"^ExecStart=\S+/surge serve ", text, re.MULTILINE)
    assert _setting(text, "NoNewPrivileges") == "yes"
    assert _setting(text, "ProtectSystem") == "strict"
