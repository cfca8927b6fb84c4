"""The web app inside `surge serve`: mounted at / (not with --no-ui), the server's routes still
win, and the app reaches the model over the server's own HTTP API with its internal key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from surge.config import EngineConfig, ServerConfig
from surge.server.app import create_app
from surge.server.auth import KeyInfo, KeyStore, hash_key
from surge.server.protocol import APIError
from surge.server.web_ui import UIConfig, internal_host
from tests.app.servers import Browser, events, wait_for
from tests.encoders.tiny_encoders import make_tiny_embedding_dir
from tests.server.conftest import TINY_ARGS
from tests.server.utils import remote_server


def test_internal_key_works_open_or_closed_and_opens_nothing() -> None:
    closed = KeyStore([(hash_key("sk-user"), KeyInfo("user"))], KeyInfo("anonymous"))
    opened = KeyStore([], KeyInfo("anonymous", rpm=5))
    for keys in (closed, opened):
        keys.add_internal(hash_key("sk-app"), KeyInfo("surge-app"))
        assert keys.authenticate("Bearer sk-app").name == "surge-app"
    assert opened.is_open and opened.authenticate(None).name == "anonymous"
    assert opened.authenticate("Bearer whatever").name == "anonymous"
    assert closed.authenticate("Bearer sk-user").name == "user"
    with pytest.raises(APIError):
        closed.authenticate("Bearer sk-wrong")


def test_internal_host() -> None:
    assert internal_host("0.0.0.0") == "127.0.0.1"
    assert internal_host("::") == "127.0.0.1"
    assert internal_host("127.0.0.1") == "127.0.0.1"
    assert internal_host("::1") == "[::1]"
    assert internal_host("10.1.2.3") == "10.1.2.3"


def client(ui: UIConfig | None, **server: object) -> TestClient:
    """The server app in-process, lifespan not run (no model is loaded): routing only."""
    app = create_app(EngineConfig(), ServerConfig(**server), ui=ui)  # type: ignore[arg-type]
    return TestClient(app, base_url="http://127.0.0.1")


def test_the_server_keeps_its_routes_and_the_app_gets_its_own(tmp_path: Path) -> None:
    c = client(UIConfig(tmp_path), api_key_hashes=(hash_key("sk-user"),))
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = c.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert c.get("/static/vendor/purify.es.mjs").status_code == 200
    # the app's paths have their own log-in; the API still wants its key
    assert c.get("/v1/models").status_code == 401
    # the server's 404s and 405s are still the server's (OpenAI's error body)
    headers = {"Authorization": "Bearer sk-user"}
    wrong_method = c.get("/v1/chat/completions", headers=headers)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    missing = c.get("/v1/nothing-here", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert c.get("/nothing-here", headers=headers).json()["error"]["type"] == "not_found_error"
    assert c.get("/docs", headers=headers).status_code == 200  # the server's docs, not the app's


def test_no_ui_serves_the_api_only() -> None:
    c = client(None)
    assert c.get("/").status_code == 404
    assert c.get("/static/app.js").status_code == 404


def test_the_app_chats_through_the_servers_api(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A key-protected server: the app's user signs up and gets a streamed answer from the
    engine, through /v1 with the internal key (no configured key is known to the app)."""
    args = [*TINY_ARGS, "--api-key", "sk-user", "--data-dir", str(tmp_path / "app")]
    with remote_server(tiny_model_dir, args) as server:
        assert httpx.get(server.url("/v1/models")).status_code == 401
        user = Browser(server.base_url)
        try:
            assert user.signup("alice").status_code == 201
            assert user.get("/api/models").json()["models"]  # the server's chat model
            conv = user.new_conversation(temperature=0.0)
            path = f"/api/conversations/{conv}/messages"
            with user.client.stream(
                "POST", path, json={"content": "hello"}, headers=user.headers()
            ) as resp:
                assert resp.status_code == 200
                seen = list(events(resp))
            kinds = [e["type"] for e in seen]
            assert kinds[0] == "start" and kinds[-1] == "done", seen[-1]
            usage = seen[-1]["usage"]
            assert isinstance(usage, dict) and usage["completion_tokens"] > 0
            usage_row = user.get("/api/admin/users").json()[0]
            assert usage_row["num_requests"] == 1
            assert usage_row["num_tokens_out"] == usage["completion_tokens"]
        finally:
            user.close()
        assert (tmp_path / "app" / "surge-app.db").exists()
        assert httpx.get(server.url("/health")).status_code == 200


def test_uploads_over_the_servers_body_limit(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The app's uploads have their own limit (--max-upload-size), not the server's 8 MiB
    --max-body-size, which still guards /v1; the app's JSON routes have a small one."""
    emb = make_tiny_embedding_dir(tmp_path / "emb")
    args = [*TINY_ARGS, "--model", f"base={tiny_model_dir}", "--model", f"emb={emb}"]
    args += ["--data-dir", str(tmp_path / "app"), "--max-upload-size", "10MiB"]
    with remote_server(None, args) as server:
        user = Browser(server.base_url)
        try:
            assert user.signup("alice").status_code == 201
            kb = user.send("POST", "/api/kbs", {"name": "big"}).json()["id"]
            path = f"/api/kbs/{kb}/documents"
            line = b"The quick brown fox jumps over the lazy dog. " * 20 + b"\n\n"
            text = line * (9 * 1024 * 1024 // len(line) + 1)  # a little over 9 MiB
            files = [("files", ("big.txt", text, "text/plain"))]
            accepted = user.client.post(path, files=files, headers=user.headers(), timeout=120)
            assert accepted.status_code == 201, accepted.text
            document = accepted.json()["uploaded"][0]["document"]
            assert document["size_bytes"] == len(text)
            doc_path = f"{path}/{document['id']}"
            wait_for(
                lambda: user.get(doc_path).json()["status"] in ("processing", "done"),
                "ingestion to start",
                timeout=60,
            )
            user.send("POST", f"{doc_path}/cancel")  # the rest of the work is not the test's

            sent = 0

            def too_big() -> Iterator[bytes]:  # 40 MiB offered, no Content-Length
                nonlocal sent
                yield b"--b\r\nContent-Disposition: form-data; name=files; filename=x.txt\r\n\r\n"
                for _ in range(40):
                    sent += 1
                    yield b"y" * (1024 * 1024)
                yield b"\r\n--b--\r\n"

            headers = {"Content-Type": "multipart/form-data; boundary=b", **user.headers()}
            refused = user.client.post(path, content=too_big(), headers=headers, timeout=60)
            assert refused.status_code == 413
            assert refused.json()["error"]["code"] == "upload_too_large"
            assert sent < 40  # refused once past the limit, not after the whole body
            huge_json = user.send("POST", "/api/conversations", {"title": "x" * (2 * 1024**2)})
            assert huge_json.status_code == 413
            assert huge_json.json()["error"]["code"] == "body_too_large"
            assert [d["file_name"] for d in user.get(path).json()] == ["big.txt"]
        finally:
            user.close()
        # /v1 keeps the server's own limit (OpenAI's error shape)
        body = b'{"model": "base", "prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}'
        v1 = httpx.post(
            server.url("/v1/completions"),
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        assert v1.status_code == 413 and v1.json()["error"]["type"] == "invalid_request_error"
