"""Keys, per-key limits, the queue limit, deadlines and keep-alive, on real tiny-model servers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import TINY_ARGS
from tests.server.utils import RemoteSurgeServer, parse_stream, remote_server, sse_events

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0}
CHAT_PROMPT = {"prompt": "hello", "max_tokens": 2, "temperature": 0}
LONG = {
    "prompt": "hello",
    "max_tokens": 500,
    "ignore_eos": True,
    "temperature": 0,
}  # >= 0.4 s of steps


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RemoteSurgeServer]:
    keys = tmp_path_factory.mktemp("keys") / "keys.jsonl"
    hashed = hashlib.sha256(b"sk-hashed").hexdigest()
    keys.write_text(
        "# team keys\n"
        "sk-plain\n"
        + json.dumps({"key": "sk-rpm", "name": "rpm", "rpm": 3})
        + "\n"
        + json.dumps({"key": "sk-tpm", "name": "tpm", "tpm": 30})
        + "\n"
        + json.dumps({"key": "sk-one", "name": "one", "max_concurrent": 1})
        + "\n"
        + json.dumps({"sha256": hashed, "name": "hashed", "priority": 5})
        + "\n"
        + json.dumps({"key": "sk-other-model", "name": "elsewhere", "models": ["another"]})
        + "\n"
    )
    args = [*TINY_ARGS, "--api-key", "sk-cli", "--api-keys-file", str(keys)]
    args += ["--cors-origins", "http://app.example"]
    with remote_server(tiny_model_dir, args) as server:
        yield server


def test_api_keys(keyed_server: RemoteSurgeServer) -> None:
    url = keyed_server.url("/v1/chat/completions")
    for headers in [{}, auth("sk-wrong"), {"Authorization": "sk-cli"}]:
        r = httpx.post(url, json=CHAT, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    for key in ["sk-cli", "sk-plain", "sk-hashed"]:
        assert httpx.post(url, json=CHAT, headers=auth(key), timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client("bad").models.list()
    assert keyed_server.client("sk-cli").models.list().data
    # health, readiness and metrics stay open for probes and scrapers
    assert httpx.get(keyed_server.url("/ready")).status_code == 200
    assert httpx.get(keyed_server.url("/metrics")).status_code == 200


def test_key_checked_before_the_body_is_read(keyed_server: RemoteSurgeServer) -> None:
    """An unauthenticated 9 MiB body is refused 401 (not 413): nothing was read or parsed."""
    r = httpx.post(keyed_server.url("/v1/completions"), content=b"x" * (9 * 2**20))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(keyed_server.url("/openapi.json")).status_code == 401
    assert httpx.get(keyed_server.url("/docs")).status_code == 401
    assert httpx.get(keyed_server.url("/openapi.json"), headers=auth("sk-cli")).status_code == 200


def test_cors_preflight(keyed_server: RemoteSurgeServer) -> None:
    headers = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    r = httpx.options(keyed_server.url("/v1/chat/completions"), headers=headers)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    evil = httpx.options(
        keyed_server.url("/v1/chat/completions"), headers={**headers, "Origin": "http://evil"}
    )
    assert "access-control-allow-origin" not in evil.headers


def test_priority_never_better_than_the_keys(keyed_server: RemoteSurgeServer) -> None:
    url = keyed_server.url("/v1/completions")
    r = httpx.post(url, json={**CHAT_PROMPT, "priority": 4}, headers=auth("sk-hashed"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
    for priority in (5, 6):
        body = {**CHAT_PROMPT, "priority": priority}
        assert httpx.post(url, json=body, headers=auth("sk-hashed"), timeout=30).status_code == 200
    r = httpx.post(url, json={**CHAT_PROMPT, "priority": -1000}, headers=auth("sk-cli"))
    assert r.status_code == 400


def test_key_limited_to_other_models(keyed_server: RemoteSurgeServer) -> None:
    r = httpx.post(
        keyed_server.url("/v1/completions"), json=CHAT_PROMPT, headers=auth("sk-other-model")
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    models = httpx.get(keyed_server.url("/v1/models"), headers=auth("sk-other-model")).json()
    assert models["data"] == []


def test_requests_per_minute(keyed_server: RemoteSurgeServer) -> None:
    url = keyed_server.url("/v1/chat/completions")
    codes = [httpx.post(url, json=CHAT, headers=auth("sk-rpm"), timeout=30) for _ in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429]
    assert codes[-1].json()["error"]["code"] == "key_rpm"
    assert 1 <= int(codes[-1].headers["Retry-After"]) <= 60
    # other keys are not affected
    assert httpx.post(url, json=CHAT, headers=auth("sk-plain"), timeout=30).status_code == 200


def test_tokens_per_minute(keyed_server: RemoteSurgeServer) -> None:
    url = keyed_server.url("/v1/completions")
    body = {"prompt": "hello " * 20, "max_tokens": 5, "temperature": 0}
    first = httpx.post(url, json=body, headers=auth("sk-tpm"), timeout=30)
    assert first.status_code == 200  # admitted with budget left, charged prompt + output (> 30)
    second = httpx.post(url, json=body, headers=auth("sk-tpm"), timeout=30)
    assert second.status_code == 429 and second.json()["error"]["code"] == "key_tpm"
    assert int(second.headers["Retry-After"]) >= 1


def test_max_concurrent_per_key(keyed_server: RemoteSurgeServer) -> None:
    async def run() -> tuple[list[str], httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            url = keyed_server.url("/v1/completions")
            body = {**LONG, "stream": True}
            async with c.stream("POST", url, json=body, headers=auth("sk-one")) as first:
                lines = first.aiter_lines()
                # its first token is out, so it holds the key's one slot for 499 more steps
                events = [(await anext(lines))[6:]]
                second = await c.post(url, json=LONG, headers=auth("sk-one"))
                events += [line[6:] async for line in lines if line.startswith("data: ")]
            return events, second

    events, second = asyncio.run(run())
    chunks, _ = parse_stream(events)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert second.status_code == 429 and second.json()["error"]["code"] == "key_concurrency"
    assert "Retry-After" in second.headers
    # the slot is given back once the stream has ended (the server releases it just after
    # [DONE], so a request sent at once may still meet it: allow that, but not for long)
    deadline = time.monotonic() + 10.0
    while True:
        after = httpx.post(
            keyed_server.url("/v1/completions"),
            json=CHAT_PROMPT,
            headers=auth("sk-one"),
            timeout=30,
        )
        if after.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert after.status_code == 200


def test_overload_gets_429_at_once(tiny_model_dir: Path) -> None:
    """Far more requests than --max-num-seqs + --max-queue: the excess is refused immediately."""
    with remote_server(
        tiny_model_dir, [*TINY_ARGS, "--max-num-seqs", "2", "--max-queue", "2"]
    ) as server:

        async def one(c: httpx.AsyncClient) -> tuple[httpx.Response, float]:
            t0 = time.monotonic()
            r = await c.post(server.url("/v1/completions"), json={**LONG, "max_tokens": 300})
            return r, time.monotonic() - t0

        async def run() -> list[tuple[httpx.Response, float]]:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=120, limits=limits) as c:
                return await asyncio.gather(*[one(c) for _ in range(32)])

        results = asyncio.run(run())
        ok = [r for r, _ in results if r.status_code == 200]
        refused = [(r, dt) for r, dt in results if r.status_code == 429]
        assert len(ok) + len(refused) == 32
        assert 4 <= len(ok) < 32 and refused
        for r, dt in refused:
            assert r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "queue_full"
            assert dt < 5.0  # at once, not after waiting (generous)
        assert all(r.json()["usage"]["completion_tokens"] == 300 for r in ok)
        rejected = server.metrics()['surge:request_rejected_total{reason="queue_full"}']
        assert rejected == len(refused)


def test_request_timeout(tiny_model_dir: Path) -> None:
    """--request-timeout ends a request with a timeout error: 504 before a response, else an SSE error."""
    with remote_server(tiny_model_dir, [*TINY_ARGS, "--request-timeout", "0.05"]) as server:
        r = httpx.post(server.url("/v1/completions"), json=LONG, timeout=60)
        assert r.status_code == 504
        assert (
            r.json()["error"]["type"] == "timeout_error"
            and r.json()["error"]["code"] == "request_timeout"
        )
        with httpx.stream(
            "POST", server.url("/v1/completions"), json={**LONG, "stream": True}, timeout=60
        ) as s:
            assert s.status_code == 200
            events = list(sse_events(s.iter_lines()))
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "request_timeout"
        # the server is fine afterwards, and the timed-out requests left the engine
        assert (
            httpx.post(
                server.url("/v1/completions"), json={**LONG, "max_tokens": 2}, timeout=60
            ).status_code
            == 200
        )
        assert server.metrics()['surge:request_success_total{finished_reason="timeout"}'] == 2


def test_keepalive_and_queue_timeout(tiny_model_dir: Path) -> None:
    """A request waiting behind another gets `: keep-alive` comments, then its queue-wait timeout."""
    args = [*TINY_ARGS, "--max-num-seqs", "1", "--keepalive-interval", "0.02"]
    args += ["--queue-timeout", "0.15"]
    with remote_server(tiny_model_dir, args) as server:

        async def run() -> list[str]:
            async with httpx.AsyncClient(timeout=60) as c:
                # the occupant's 8 x 500 sequential steps take >= 1 s once it has its first token
                body = {**LONG, "n": 8, "stream": True}
                async with c.stream("POST", server.url("/v1/completions"), json=body) as occupant:
                    lines = occupant.aiter_lines()
                    assert (await anext(lines)).startswith("data: {")
                    waiter = c.stream(
                        "POST", server.url("/v1/completions"), json={**LONG, "stream": True}
                    )
                    async with waiter as s:
                        return [e async for e in _aiter_events(s)]

        chunks, comments = parse_stream(asyncio.run(run()))
        assert comments and all(c == ": keep-alive" for c in comments)
        assert len(chunks) == 1 and chunks[0]["error"]["code"] == "queue_timeout"
        assert chunks[0]["error"]["type"] == "timeout_error"


async def _aiter_events(response: httpx.Response) -> list[str]:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield line[6:]
        elif line.startswith(":"):
            yield line
