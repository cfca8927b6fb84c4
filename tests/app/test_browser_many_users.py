"""Eight users chatting at once in eight real browsers against the real `surge serve` (the tiny
random model, float32, greedy): every answer completes, each is exactly what its prompt gets
alone, and no page shows another user's text. No wall-clock assertion: waits only turn a hang
into a failure."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests.app.browser import PageFactory
from tests.server.conftest import TINY_ARGS
from tests.server.utils import RemoteSurgeServer, remote_server
from tests.tiny_models import make_tiny_model_dir

pytest.importorskip("playwright.sync_api", reason="the playwright package (the [test] extra)")
from playwright.sync_api import Page, expect  # noqa: E402

pytestmark = pytest.mark.timeout(300)

NUM_USERS = 8
PASSWORD = "password123"
ANSWER_TIMEOUT_MS = 120_000  # a hang, not a slow machine
STEP_TIMEOUT_MS = 30_000  # a sign-up hashes its password on a machine shared with 8 browsers
WORDS = ["apple", "river", "mountain", "violin", "harbor", "comet", "lantern", "meadow"]
PROMPTS = [f"User {i} asks about the {w}." for i, w in enumerate(WORDS)]
# the page's answer, as it holds it: its raw text, whether it is still streaming, its state
ANSWER_JS = """() => [...document.querySelectorAll('.msg-assistant')].map((el) => ({
  content: el.msg.content, streaming: !!el.streaming, id: el.msg.id,
  failed: el.classList.contains('failed'), note: el.querySelector('.msg-note').textContent }))"""
DONE_JS = """() => { const a = document.querySelector('.msg-assistant');
  return a !== null && !a.streaming && (a.msg.id !== null || a.classList.contains('failed')); }"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteSurgeServer]:
    root = tmp_path_factory.mktemp("many-users")
    model = make_tiny_model_dir(root / "tiny")
    args = [*TINY_ARGS, "--data-dir", str(root / "app"), "--max-num-seqs", str(NUM_USERS)]
    with remote_server(model, args) as s:
        yield s


def sign_up_for_greedy_chat(page: Page, username: str, prompt: str) -> None:
    """Sign up, set the new chat's temperature to 0, and type the prompt (not sent yet)."""
    page.click(".switch-auth")
    expect(page.locator(".auth-form.signup")).to_be_visible(timeout=STEP_TIMEOUT_MS)
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click(".auth-form button[type=submit]")
    expect(page.locator(".composer-input")).to_be_visible(timeout=STEP_TIMEOUT_MS)
    page.click(".settings-toggle")
    page.fill(".settings .temperature", "0")
    page.click(".settings button[type=submit]")
    expect(page.locator(".settings .saved-note")).not_to_be_empty(timeout=STEP_TIMEOUT_MS)
    page.fill(".composer-input", prompt)


def alone(server: RemoteSurgeServer, model: str, prompt: str) -> str:
    """What the server answers `prompt` with, by itself: the body the app sends (no system
    prompt set, so the user's message only), without streaming."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
    r = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_eight_users_chat_at_once(server: RemoteSurgeServer, open_page: PageFactory) -> None:
    pages = [open_page(server.base_url) for _ in range(NUM_USERS)]
    for i, page in enumerate(pages):
        sign_up_for_greedy_chat(page, f"user{i}", PROMPTS[i])
    for page in pages:  # every send starts before any answer is waited for
        page.press(".composer-input", "Enter")
    for page in pages:
        page.wait_for_function(DONE_JS, timeout=ANSWER_TIMEOUT_MS)

    model = httpx.get(server.url("/v1/models")).json()["data"][0]["id"]
    expected = [alone(server, model, p) for p in PROMPTS]
    assert all(expected) and len(set(expected)) > 1  # answers that tell the prompts apart
    for i, page in enumerate(pages):
        answers = page.evaluate(ANSWER_JS)
        assert len(answers) == 1 and not answers[0]["failed"], answers
        assert answers[0]["content"] == expected[i]  # what the page holds: this prompt's answer
        user_texts = page.locator(".msg-user .msg-body").all_inner_texts()
        assert user_texts == [PROMPTS[i]]
        shown = page.locator(".chat-main").inner_text()
        others = [w for j, w in enumerate(WORDS) if j != i and w in shown]
        assert others == [], f"user{i}'s page shows other users' prompts"
        match = re.search(r"#/c/(\d+)$", page.url)
        assert match is not None
        saved = page.evaluate(
            "async (id) => (await fetch(`api/conversations/${id}`)).json()", int(match[1])
        )
        contents = [(m["role"], m["content"], m["status"]) for m in saved["messages"]]
        assert contents == [
            ("user", PROMPTS[i], "complete"),
            ("assistant", expected[i], "complete"),
        ]
        assert page.errors == []  # type: ignore[attr-defined]
