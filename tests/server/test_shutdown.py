"""SIGTERM: stop admitting (503), let in-flight requests finish within the grace period, exit."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx

from tests.server.conftest import TINY_ARGS
from tests.server.utils import RemoteSurgeServer, parse_stream


def test_sigterm_drains(tiny_model_dir: Path) -> None:
    server = RemoteSurgeServer(tiny_model_dir, [*TINY_ARGS, "--shutdown-grace", "30"])
    try:
        body = {
            "prompt": "hello",
            "max_tokens": 500,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }

        async def run() -> tuple[list[str], int, int]:
            async with httpx.AsyncClient(timeout=60) as c:
                async with c.stream("POST", server.url("/v1/completions"), json=body) as s:
                    lines = s.aiter_lines()
                    events = [(await anext(lines))[6:]]
                    server.proc.send_signal(signal.SIGTERM)
                    await asyncio.sleep(0.1)
                    ready = (await c.get(server.url("/ready"))).status_code
                    refused = await c.post(
                        server.url("/v1/completions"), json={"prompt": "hi", "max_tokens": 2}
                    )
                    events += [line[6:] async for line in lines if line.startswith("data: ")]
                return events, ready, refused.status_code

        events, ready, refused = asyncio.run(run())
        assert ready == 503 and refused == 503
        chunks, _ = parse_stream(events)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # finished, not cut
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.close()
