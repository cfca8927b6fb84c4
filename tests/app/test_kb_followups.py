"""Follow-up questions in a knowledge-base conversation, over real HTTP against the fake model
service: the earlier user turns join the search (surge.app.kb.followup), and with the admin's
`rewrite_queries` the chat model's standalone rewrite is searched instead, a failed rewrite
falling back. Retrieval quality of follow-ups is measured in tests/app_kb/test_golden.py."""

from __future__ import annotations

import pytest

from surge.app.kb.cite import NOT_FOUND
from tests.app.conftest import STORES, AppFactory
from tests.app.fake_upstream import FakeUpstream
from tests.app.servers import Browser
from tests.app.test_kb_api import QUESTION, kb_with_documents

FOLLOW_UP = "What should I do about it?"  # no keyword at all: alone, it finds nothing

pytestmark = STORES  # each test on SQLite and on PostgreSQL


@pytest.fixture
def app_url(make_app: AppFactory) -> str:
    return make_app(max_requests_per_minute=1_000_000)


def rewrites(fake: FakeUpstream) -> list[str]:
    """The user messages of the rewrite requests the fake service got."""
    return [
        r["messages"][1]["content"]  # type: ignore[index]
        for r in fake.requests
        if "standalone search query" in r["messages"][0]["content"]  # type: ignore[index]
    ]


def ask_in_conversation(b: Browser, kb: int, turns: list[str]) -> dict[str, object]:
    """Send `turns` one by one in a new conversation with `kb`; the last answer's done event."""
    cid = b.new_conversation()
    assert b.send("PUT", f"/api/conversations/{cid}/kbs", {"kb_ids": [kb]}).status_code == 200
    for turn in turns:
        evs = b.stream("POST", f"/api/conversations/{cid}/messages", {"content": turn})
        assert evs[-1]["type"] == "done", evs[-1]
    return evs[-1]


def num_requests(admin: Browser) -> int:
    [me] = [u for u in admin.get("/api/admin/users").json() if u["username"] == "alice"]
    return me["num_requests"]


def test_a_follow_up_is_searched_with_the_conversation(admin: Browser, fake: FakeUpstream) -> None:
    kb = kb_with_documents(admin)
    alone = admin.send("POST", f"/api/kbs/{kb}/ask", {"question": FOLLOW_UP, "stream": False})
    assert alone.json()["found"] is False and alone.json()["answer"] == NOT_FOUND["en"]

    done = ask_in_conversation(admin, kb, [QUESTION, FOLLOW_UP])
    assert done["found"] is True
    assert "E-4471" in done["passages"][0]["text"]  # type: ignore[index]
    assert rewrites(fake) == []  # rewriting is off by default: no extra request

    done = ask_in_conversation(
        admin, kb, [QUESTION, "At what time in the morning does the library open?"]
    )
    assert "library opens at nine" in done["passages"][0]["text"]  # type: ignore[index]


def test_the_admin_may_turn_on_rewriting_and_a_failed_rewrite_falls_back(
    admin: Browser, fake: FakeUpstream
) -> None:
    assert admin.get("/api/admin/settings").json() == {
        "signup_open": True,
        "rewrite_queries": False,
    }
    resp = admin.send("PUT", "/api/admin/settings", {"rewrite_queries": True})
    assert resp.json() == {"signup_open": True, "rewrite_queries": True}  # sign-up untouched
    kb = kb_with_documents(admin)
    fake.requests.clear()
    fake.rewrite_reply = '"library opening hours"'  # the rewrite decides the search
    before = num_requests(admin)
    done = ask_in_conversation(admin, kb, [QUESTION, FOLLOW_UP])
    assert "library opens at nine" in done["passages"][0]["text"]  # type: ignore[index]
    [asked] = rewrites(fake)  # the standalone first question was not rewritten
    assert asked == f"Earlier question: {QUESTION}\nLast question: {FOLLOW_UP}"
    assert num_requests(admin) == before + 3  # two answers and the rewrite

    for reply in ("#503", "   "):  # an error, an empty rewrite: the conversation's query
        fake.rewrite_reply = reply
        done = ask_in_conversation(admin, kb, [QUESTION, FOLLOW_UP])
        assert done["found"] is True
        assert "E-4471" in done["passages"][0]["text"]  # type: ignore[index]

    admin.send("PUT", "/api/admin/settings", {"rewrite_queries": False})
    fake.requests.clear()
    ask_in_conversation(admin, kb, [QUESTION, FOLLOW_UP])
    assert rewrites(fake) == []
