"""The bundled model under concurrent load: no mixing, disconnects free the engine, core crashes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.utils import RemoteSurgeServer, remote_server

pytestmark = pytest.mark.slow

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(default_model_path: Path) -> Iterator[RemoteSurgeServer]:
    # float32: batch-size-independent greedy results are the point of the first test
    # no MODEL argument: the bundled default (default_model_path only makes sure it is fetched)
    with remote_server(None, ["--dtype", "float32", "--kv-cache-memory", "512MiB"]) as s:
        yield s


def chat(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Give one short fact about the number {i}."}]


async def stream_chat(client, i: int) -> str:  # noqa: ANN001 - openai.AsyncOpenAI
    text, finish = "", None
    stream = await client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=chat(i),
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish in {"stop", "length"}
    return text


def test_64_concurrent_streams_match_alone(server: RemoteSurgeServer) -> None:
    client = server.client()
    alone = [
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=chat(i), max_tokens=MAX_TOKENS, temperature=0
        )
        .choices[0]
        .message.content
        for i in range(64)
    ]
    assert len(set(alone)) > 32  # distinct prompts, distinct answers: mixing would show

    async def run() -> list[str]:
        aclient = server.async_client()
        return await asyncio.gather(*[stream_chat(aclient, i) for i in range(64)])

    together = asyncio.run(run())
    assert together == alone


def test_cut_streams_free_the_engine(server: RemoteSurgeServer) -> None:
    """32 clients leave after a few tokens: running requests and KV usage go back to 0 within 2 s."""

    async def cut(c: httpx.AsyncClient, i: int) -> int:
        body = {
            "messages": chat(i),
            "max_tokens": 400,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        seen = 0
        async with c.stream("POST", server.url("/v1/chat/completions"), json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen >= 4:
                        break  # leaving the block closes the connection mid-stream
        return seen

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*[cut(c, i) for i in range(32)])

    assert asyncio.run(run()) == [4] * 32
    deadline = time.monotonic() + 2.0
    while True:
        m = server.metrics()
        if m["surge:num_requests_running"] == 0 and m["surge:kv_cache_usage_perc"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m['surge:request_success_total{finished_reason="abort"}'] >= 32


def test_kill_engine_core_mid_stream(server: RemoteSurgeServer) -> None:
    """kill -9 of the core: open streams get an error event and [DONE] within 2 s; it comes back."""
    client = server.client()
    before = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=chat(7), max_tokens=MAX_TOKENS, temperature=0
    )
    started: asyncio.Event
    ends: list[float] = []

    async def open_stream(c: httpx.AsyncClient, i: int, n_started: list[int]) -> list[str]:
        body = {
            "messages": chat(i),
            "max_tokens": 2000,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        events = []
        async with c.stream("POST", server.url("/v1/chat/completions"), json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        n_started.append(i)
                        if len(n_started) == 8:
                            started.set()
        ends.append(time.monotonic())
        return events

    async def run() -> tuple[list[list[str]], float]:
        nonlocal started
        started = asyncio.Event()
        n_started: list[int] = []
        async with httpx.AsyncClient(timeout=60) as c:
            tasks = [asyncio.create_task(open_stream(c, i, n_started)) for i in range(8)]
            await asyncio.wait_for(started.wait(), 120)
            os.kill(server.core_pid(), signal.SIGKILL)
            killed_at = time.monotonic()
            return await asyncio.gather(*tasks), killed_at

    streams, killed_at = asyncio.run(run())
    for events in streams:
        assert events[-1] == "[DONE]"
        assert "error" in json.loads(events[-2])
    assert max(ends) - killed_at < 2.0
    assert httpx.get(server.url("/ready")).status_code == 503
    assert httpx.get(server.url("/health")).status_code == 200
    server.wait_ready(240)
    after = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=chat(7), max_tokens=MAX_TOKENS, temperature=0
    )
    assert after.choices[0].message.content == before.choices[0].message.content
