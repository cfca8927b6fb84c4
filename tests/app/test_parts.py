"""The app's parts without HTTP: the rate limiter, the stream parser; and mounting the app."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from argon2 import PasswordHasher
from fastapi import FastAPI

from surge.app.config import AppConfig
from surge.app.limits import is_upload_path
from surge.app.main import create_app, mount_app
from surge.app.security import RateLimiter, csrf_matches, hash_token
from surge.app.upstream import Delta, KeepAlive, UpstreamError, Usage, error_from_status, parse_line
from tests.app.servers import ServerThread


def test_rate_limiter_bucket_refills_with_the_clock() -> None:
    now = [0.0]
    limiter = RateLimiter(max_per_minute=2, clock=lambda: now[0])
    assert limiter.allow("a") and limiter.allow("a")
    assert not limiter.allow("a")
    assert limiter.allow("b")  # per key
    assert limiter.retry_after_s("a") == pytest.approx(30.0)
    now[0] += 30.0
    assert limiter.allow("a") and not limiter.allow("a")
    now[0] += 3600.0  # an idle bucket is forgotten, and starts full
    assert limiter.allow("c")
    assert "a" not in limiter._buckets
    assert limiter.allow("a") and limiter.allow("a") and not limiter.allow("a")


def test_passwords_use_argon2id_with_the_library_defaults(real_hasher: PasswordHasher) -> None:
    default = PasswordHasher()
    stored = real_hasher.hash("password123")
    assert (
        stored.startswith("$argon2id$")
        and f"m={default.memory_cost},t={default.time_cost}" in stored
    )
    assert real_hasher.verify(stored, "password123")


async def _verify_wrong() -> bool:
    from surge.app.security import hash_password, verify_password

    stored = await hash_password("password123")
    return await verify_password(stored, "password124") or await verify_password(None, "x")


def test_verify_password_rejects_wrong_and_unknown() -> None:
    import asyncio

    assert asyncio.run(_verify_wrong()) is False


def test_tokens_and_csrf_helpers() -> None:
    assert hash_token("t") != "t" and len(hash_token("t")) == 64
    assert csrf_matches("abc", "abc")
    assert not csrf_matches("abc", "abd") and not csrf_matches("abc", None)


def test_parse_line() -> None:
    delta = 'data: {"choices":[{"delta":{"content":"hi"}}]}'
    assert parse_line(delta) == [Delta("hi")]
    assert parse_line('data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}') == [
        Usage(3, 2)
    ]
    assert parse_line(": keep-alive") == [KeepAlive()]
    assert parse_line("") == [] and parse_line('data: {"choices":[{"delta":{"role":"x"}}]}') == []
    assert parse_line("data: [DONE]") is None
    with pytest.raises(UpstreamError) as e:
        parse_line('data: {"error":{"message":"boom"}}')
    assert "boom" in e.value.message and e.value.retryable
    with pytest.raises(UpstreamError):
        parse_line("data: {not json")


def test_error_from_status() -> None:
    plain = error_from_status(400, b'{"error":{"message":"max_tokens too large"}}', None)
    assert plain.message == "max_tokens too large" and not plain.retryable
    odd = error_from_status(503, b"<html>", "soon")
    assert "unavailable" in odd.message and odd.retryable and odd.retry_after_s is None


def test_mount_app_runs_the_app_lifespan(tmp_path: Path) -> None:
    parent = FastAPI()

    @parent.get("/v1/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    mount_app(parent, create_app(AppConfig(data_dir=tmp_path)))
    server = ServerThread(parent)
    try:
        with httpx.Client(base_url=server.base_url) as client:
            assert client.get("/v1/ping").json() == {"pong": "yes"}
            assert client.get("/api/health").json() == {"status": "ok"}
            signup = {"username": "alice", "password": "password123"}
            assert client.post("/api/signup", json=signup).status_code == 201  # the store is up
    finally:
        server.stop()
    assert (tmp_path / "surge-app.db").exists()


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        AppConfig(max_requests_per_minute=0)


def test_upload_paths() -> None:
    """The routes that take max_upload_bytes; every other body gets max_json_bytes."""
    assert is_upload_path("/api/kbs/3/documents")
    assert is_upload_path("/api/conversations/12/files")
    assert not is_upload_path("/api/kbs/3/documents/4/reindex")
    assert not is_upload_path("/api/conversations/12/messages")
    assert not is_upload_path("/api/kbs/x/documents")
    with pytest.raises(ValueError):
        AppConfig(max_json_bytes=0)
