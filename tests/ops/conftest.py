"""Prometheus's tools for the ops tests: Debian's `prometheus` package, installed if missing."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.apt import apt_install


@dataclass(frozen=True)
class PrometheusTools:
    prometheus: str
    promtool: str

    def promtool_run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`promtool ARGS`; its output is in the result."""
        return subprocess.run(
            [self.promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120
        )


def _found() -> PrometheusTools | None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    return None if prometheus is None or promtool is None else PrometheusTools(prometheus, promtool)


@pytest.fixture(scope="session")
def prometheus_tools() -> PrometheusTools:
    """`prometheus` and `promtool`; apt-get installs Debian's package when they are missing,
    and the test skips, saying why, where that can't be done."""
    found = _found()
    if found is None:
        problem = apt_install("prometheus")
        found = _found()
        if found is None:
            pytest.skip(f"no prometheus/promtool and they can't be installed: {problem}")
    return found
