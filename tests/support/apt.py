"""Debian packages the tests need (Chromium, Prometheus), installed with apt-get when missing.

As root and non-interactive; where that is impossible the caller skips and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess

APT_TIMEOUT_S = 900


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=APT_TIMEOUT_S,
        check=False,
    )


def apt_install(*packages: str) -> str | None:
    """`apt-get install -y PACKAGES` (after `apt-get update` if the first try fails); None when
    it worked, else why not."""
    if shutil.which("apt-get") is None:
        return "there is no apt-get here"
    if os.geteuid() != 0:
        return "apt-get install needs root"
    result = _apt_get("install", "-y", "--no-install-recommends", *packages)
    if result.returncode != 0:  # an old or missing package list: refresh it once
        _apt_get("update")
        result = _apt_get("install", "-y", "--no-install-recommends", *packages)
    if result.returncode != 0:
        return f"apt-get install {' '.join(packages)} failed: {result.stderr.strip()[-500:]}"
    return None
