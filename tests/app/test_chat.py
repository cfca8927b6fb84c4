"""Conversations and streaming chat over real HTTP, against the fake model service."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.app.conftest import STORES, AppFactory
from tests.app.fake_upstream import FakeUpstream
from tests.app.servers import Browser, events, wait_for

NewBrowser = Callable[[], Browser]

pytestmark = STORES  # each test on SQLite and on PostgreSQL


def _types(evs: list[dict[str, object]]) -> list[object]:
    return [e["type"] for e in evs]


def _text(evs: list[dict[str, object]]) -> str:
    return "".join(str(e["text"]) for e in evs if e["type"] == "delta")


def test_streamed_answer_is_saved(admin: Browser, fake: FakeUpstream) -> None:
    cid = admin.new_conversation(model="chat-a", system_prompt="Be brief.", temperature=0.3)
    evs = admin.stream("POST", f"/api/conversations/{cid}/messages", {"content": "hello there"})
    assert _types(evs)[:3] == ["start", "status", "status"]
    assert [e.get("state") for e in evs[1:3]] == ["waiting", "generating"]
    assert evs[-1]["type"] == "done" and evs[-1]["model"] == "chat-a"
    assert evs[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3}
    answer = _text(evs)
    assert answer.endswith(": hello there")

    sent = fake.requests[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == "chat-a" and sent["temperature"] == 0.3
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
    ]
    assert fake.headers[-1]["authorization"] == "Bearer upstream-key"

    conv = admin.get(f"/api/conversations/{cid}").json()
    assert conv["title"] == "hello there"  # the first message names an untitled chat
    msgs = conv["messages"]
    assert [(m["role"], m["status"]) for m in msgs] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert msgs[0]["id"] == evs[0]["user_message_id"] and msgs[1]["id"] == evs[-1]["message_id"]
    assert msgs[1]["content"] == answer and msgs[1]["num_tokens_out"] == 3


def test_default_model_is_the_first_chat_model(admin: Browser, fake: FakeUpstream) -> None:
    cid = admin.new_conversation()
    evs = admin.stream("POST", f"/api/conversations/{cid}/messages", {"content": "hi"})
    assert evs[-1]["model"] == "chat-a" and fake.requests[-1]["model"] == "chat-a"
    assert "temperature" not in fake.requests[-1]  # the service's default


def test_models_list_only_chat_models(admin: Browser) -> None:
    assert admin.get("/api/models").json() == {"models": ["chat-a", "legacy-b"]}


def test_conversations_list_rename_search_delete(admin: Browser) -> None:
    first = admin.new_conversation(title="Trip to Lisbon")
    second = admin.new_conversation()
    admin.stream("POST", f"/api/conversations/{second}/messages", {"content": "bake sourdough"})
    listed = [c["id"] for c in admin.get("/api/conversations").json()]
    assert listed == [second, first]  # most recently active first

    renamed = admin.send("PATCH", f"/api/conversations/{first}", {"title": "Porto instead"})
    assert renamed.json()["title"] == "Porto instead"
    assert [c["id"] for c in admin.get("/api/conversations").json()] == [first, second]

    def search(q: str) -> list[int]:
        return [c["id"] for c in admin.get("/api/conversations", params={"q": q}).json()]

    assert search("porto") == [first]  # title, case-insensitive
    assert search("SOURDOUGH") == [second]  # message text
    assert search("100%") == []  # LIKE wildcards are literal

    assert admin.send("DELETE", f"/api/conversations/{first}").status_code == 204
    assert admin.get(f"/api/conversations/{first}").status_code == 404
    assert search("") == [second]


def test_conversation_settings_validated(admin: Browser) -> None:
    resp = admin.send("POST", "/api/conversations", {"temperature": 9})
    assert resp.status_code == 422
    cid = admin.new_conversation()
    empty = admin.send("POST", f"/api/conversations/{cid}/messages", {"content": "   "})
    assert empty.status_code == 422


def test_other_users_conversations_are_404(admin: Browser, browsers: NewBrowser) -> None:
    cid = admin.new_conversation(title="mine")
    admin.stream("POST", f"/api/conversations/{cid}/messages", {"content": "secret"})
    msg_id = admin.get(f"/api/conversations/{cid}").json()["messages"][0]["id"]
    bob = browsers()
    bob.signup("bob")
    path = f"/api/conversations/{cid}"
    assert bob.get(path).status_code == 404
    assert bob.send("PATCH", path, {"title": "stolen"}).status_code == 404
    assert bob.send("DELETE", path).status_code == 404
    assert bob.send("POST", f"{path}/messages", {"content": "x"}).status_code == 404
    assert bob.send("POST", f"{path}/regenerate").status_code == 404
    assert bob.send("PUT", f"{path}/messages/{msg_id}", {"content": "x"}).status_code == 404
    assert bob.get("/api/conversations").json() == []
    assert bob.get("/api/conversations", params={"q": "secret"}).json() == []
    still = admin.get(path).json()
    assert still["title"] == "mine" and len(still["messages"]) == 2


def test_stop_saves_the_partial_answer_and_closes_upstream(
    admin: Browser, fake: FakeUpstream
) -> None:
    fake.stall_closed.clear()
    cid = admin.new_conversation()
    path = f"/api/conversations/{cid}/messages"
    seen = []
    with admin.client.stream(
        "POST", path, json={"content": "#stall"}, headers=admin.headers()
    ) as r:
        for event in events(r):
            seen.append(event)
            if event["type"] == "delta":
                break  # the user presses Stop: the browser closes the stream
    assert _text(seen) == "partial "
    assert fake.stall_closed.wait(20), "the app kept the service's request open"

    def saved() -> list[dict[str, object]]:
        return admin.get(f"/api/conversations/{cid}").json()["messages"]

    wait_for(lambda: len(saved()) == 2, "the stopped answer to be saved")
    answer = saved()[1]
    assert answer["status"] == "stopped" and answer["content"] == "partial "


def test_regenerate_replaces_the_last_answer(admin: Browser, fake: FakeUpstream) -> None:
    cid = admin.new_conversation()
    path = f"/api/conversations/{cid}"
    admin.stream("POST", f"{path}/messages", {"content": "one"})
    before = admin.get(path).json()["messages"]
    evs = admin.stream("POST", f"{path}/regenerate")
    assert evs[-1]["type"] == "done"
    after = admin.get(path).json()["messages"]
    assert [m["role"] for m in after] == ["user", "assistant"]
    assert after[0]["id"] == before[0]["id"]
    assert after[1]["id"] != before[1]["id"] and after[1]["content"] == _text(evs)
    assert after[1]["content"] != before[1]["content"]  # a new answer ("echo N" counts)
    assert fake.requests[-1]["messages"] == [{"role": "user", "content": "one"}]


def test_regenerate_with_nothing_to_answer(admin: Browser) -> None:
    cid = admin.new_conversation()
    resp = admin.send("POST", f"/api/conversations/{cid}/regenerate")
    assert resp.status_code == 400


def test_edit_and_resend_drops_what_followed(admin: Browser, fake: FakeUpstream) -> None:
    cid = admin.new_conversation()
    path = f"/api/conversations/{cid}"
    admin.stream("POST", f"{path}/messages", {"content": "first question"})
    admin.stream("POST", f"{path}/messages", {"content": "second question"})
    first_id = admin.get(path).json()["messages"][0]["id"]
    evs = admin.stream("PUT", f"{path}/messages/{first_id}", {"content": "better question"})
    assert evs[-1]["type"] == "done"
    msgs = admin.get(path).json()["messages"]
    assert [(m["role"], m["content"]) for m in msgs] == [
        ("user", "better question"),
        ("assistant", _text(evs)),
    ]
    assert msgs[0]["id"] == first_id
    assert fake.requests[-1]["messages"] == [{"role": "user", "content": "better question"}]
    answer_id = msgs[1]["id"]
    resp = admin.send("PUT", f"{path}/messages/{answer_id}", {"content": "x"})
    assert resp.status_code == 400  # only user messages are edited


def _error_event(admin: Browser, content: str) -> tuple[dict[str, object], int]:
    cid = admin.new_conversation()
    evs = admin.stream("POST", f"/api/conversations/{cid}/messages", {"content": content})
    assert evs[-1]["type"] == "error"
    return evs[-1], cid


def test_service_429_and_503_are_readable_errors(admin: Browser) -> None:
    busy, cid = _error_event(admin, "#429")
    assert busy["status"] == 429 and busy["retryable"] is True and busy["retry_after_s"] == 2
    assert "busy" in str(busy["message"]) and "queue full" in str(busy["message"])
    saved = admin.get(f"/api/conversations/{cid}").json()["messages"]
    assert saved[1]["status"] == "error" and saved[1]["error"] == busy["message"]
    down, _ = _error_event(admin, "#503")
    assert down["status"] == 503 and down["retryable"] is True
    assert "unavailable" in str(down["message"])


def test_error_then_retry_by_editing(admin: Browser) -> None:
    _, cid = _error_event(admin, "#429")
    path = f"/api/conversations/{cid}"
    user_id = admin.get(path).json()["messages"][0]["id"]
    evs = admin.stream("PUT", f"{path}/messages/{user_id}", {"content": "again"})
    assert evs[-1]["type"] == "done"
    assert [m["status"] for m in admin.get(path).json()["messages"]] == ["complete", "complete"]


def test_error_in_the_middle_keeps_the_partial_text(admin: Browser) -> None:
    err, cid = _error_event(admin, "#midway")
    assert err["status"] == 500 and "engine failed" in str(err["message"])
    saved = admin.get(f"/api/conversations/{cid}").json()["messages"][1]
    assert saved["status"] == "error" and saved["content"] == "half an "


def test_service_timeout_is_a_readable_error(make_app: AppFactory) -> None:
    b = Browser(make_app(upstream_read_timeout_s=0.2))
    try:
        b.signup("alice")
        err, _ = _error_event(b, "#hang")
        assert err["status"] == 504 and err["retryable"] is True
        assert "in time" in str(err["message"])
    finally:
        b.close()


def test_service_down_is_a_readable_error(make_app: AppFactory) -> None:
    b = Browser(make_app(api_base="http://127.0.0.1:9/v1"))  # port 9 (discard): refused
    try:
        b.signup("alice")
        err, _ = _error_event(b, "hello")
        assert err["status"] == 502 and err["retryable"] is True
        assert "can't be reached" in str(err["message"])
        models = b.get("/api/models")
        assert models.status_code == 502 and "can't be reached" in models.json()["error"]["message"]
    finally:
        b.close()


def test_admin_sees_usage(admin: Browser, browsers: NewBrowser) -> None:
    bob = browsers()
    bob.signup("bob")
    cid = bob.new_conversation()
    bob.stream("POST", f"/api/conversations/{cid}/messages", {"content": "count these words"})
    bob.stream("POST", f"/api/conversations/{cid}/regenerate")
    usage = {u["username"]: u for u in admin.get("/api/admin/users").json()}
    assert usage["bob"]["num_requests"] == 2
    assert usage["bob"]["num_tokens_in"] == 6 and usage["bob"]["num_tokens_out"] == 6
    assert usage["alice"]["num_requests"] == 0


def test_the_session_must_exist(app_url: str) -> None:
    with httpx.Client(base_url=app_url) as anonymous:
        assert anonymous.get("/api/conversations").status_code == 401
        assert anonymous.get("/api/models").status_code == 401


def test_a_stalled_stream_blocks_no_one(admin: Browser, browsers: NewBrowser) -> None:
    bob = browsers()
    bob.signup("bob")
    slow = admin.new_conversation()
    fast = bob.new_conversation()
    path = f"/api/conversations/{slow}/messages"
    with admin.client.stream(
        "POST", path, json={"content": "#stall"}, headers=admin.headers()
    ) as r:
        for event in events(r):
            if event["type"] == "delta":
                break
        # alice's answer is still open: bob chats meanwhile, and his answer is his own
        evs = bob.stream("POST", f"/api/conversations/{fast}/messages", {"content": "bob here"})
        assert evs[-1]["type"] == "done" and _text(evs).endswith(": bob here")
    assert "partial" not in _text(evs)
