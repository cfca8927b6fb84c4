"""Encoder worker faults: killed mid-request, a model that can't load, a parent that dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surge.encoders import EncoderClient, EncoderConfig, EncoderDeadError
from tests.encoders.conftest import LoopThread, start_client

pytestmark = pytest.mark.timeout(180)


def test_killed_worker_fails_pending_calls(
    loop_thread: LoopThread, tiny_embedding_dir: Path
) -> None:
    client = start_client(loop_thread, tiny_embedding_dir)
    pid = client.pid
    assert pid is not None and client.is_alive()
    os.kill(pid, signal.SIGSTOP)  # the calls below stay pending until the kill

    async def go() -> list[object]:
        calls = [asyncio.create_task(client.embed([f"text {i}"])) for i in range(3)]
        while client.num_in_flight < 3:
            await asyncio.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        results = loop_thread.run(go(), timeout=30)  # a hang fails here, not forever
    finally:
        loop_thread.run(client.close())
    assert all(isinstance(r, EncoderDeadError) for r in results), results
    assert "exited with code -9" in str(results[0])
    assert not client.is_alive() and client.num_in_flight == 0
    with pytest.raises(EncoderDeadError):
        loop_thread.run(client.embed(["after death"]))


def test_load_failure_raises_with_the_reason(loop_thread: LoopThread, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    config = EncoderConfig(model=tmp_path, num_threads=1)
    with pytest.raises(EncoderDeadError, match="neither an embedding nor a rerank model"):
        loop_thread.run(EncoderClient.start(config), timeout=120)


def _running(pid: int) -> bool:
    """Whether pid runs (an exited child nobody has reaped yet is a zombie: not running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


ORPHAN_SCRIPT = """
import asyncio, os, sys
from surge.encoders import EncoderClient, EncoderConfig

async def main():
    client = await EncoderClient.start(EncoderConfig(sys.argv[1], num_threads=1))
    print(client.pid, flush=True)
    os._exit(0)  # no close(), no atexit: the worker must notice on its own

if __name__ == "__main__":
    asyncio.run(main())
"""


@pytest.mark.slow
def test_worker_exits_when_its_parent_dies(tmp_path: Path, tiny_embedding_dir: Path) -> None:
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), str(tiny_embedding_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    pid = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 30  # generous: the worker polls its parent every second
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _running(pid):
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"encoder worker {pid} outlived its parent")
