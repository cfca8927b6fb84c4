"""The browser UI in a real browser (Debian's Chromium under Playwright) against the app and the
scripted fake model service. Few tests, each a whole user journey; waits are for what the page
shows, never for time."""

from __future__ import annotations

import re

import pytest

from tests.app.browser import PageFactory
from tests.app.conftest import AppFactory
from tests.app.fake_upstream import FakeUpstream

pytest.importorskip("playwright.sync_api", reason="the playwright package (the [test] extra)")
from playwright.sync_api import Page, Route, expect  # noqa: E402

PASSWORD = "password123"


expect.set_options(timeout=10_000)


def sign_up(page: Page, username: str) -> None:
    page.click(".switch-auth")
    expect(page.locator(".auth-form.signup")).to_be_visible()
    log_in(page, username)


def log_in(page: Page, username: str) -> None:
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click(".auth-form button[type=submit]")
    expect(page.locator(".composer-input")).to_be_visible()


def send(page: Page, text: str) -> None:
    page.fill(".composer-input", text)
    page.press(".composer-input", "Enter")


def last_answer(page: Page):  # type: ignore[no-untyped-def]
    return page.locator(".msg-assistant").last


def test_sign_up_chat_with_markdown_and_log_in_again(app_url: str, open_page: PageFactory) -> None:
    page = open_page(app_url)
    sign_up(page, "alice")
    expect(page.locator(".admin-link")).to_be_visible()  # the first user is the admin
    send(page, "Hello **bold** and `code`\n\n```python\nprint(1)\n```")
    answer = last_answer(page)
    expect(answer.locator(".msg-body strong")).to_have_text("bold")
    expect(answer.locator("pre code.hljs")).to_contain_text("print(1)")  # highlighted
    expect(answer.locator("pre .copy-code")).to_be_visible()
    expect(page.locator(".status-line")).to_have_text("")
    expect(answer.locator(".msg-body")).to_contain_text("echo")
    expect(page.locator(".conv-title")).to_have_text(re.compile("^Hello"))  # named by the server
    assert re.search(r"#/c/\d+$", page.url)

    page.click(".logout")
    expect(page.locator(".auth-form.login")).to_be_visible()
    log_in(page, "alice")
    page.click(".conv-link")
    expect(last_answer(page).locator(".msg-body strong")).to_have_text("bold")
    assert page.errors == []  # type: ignore[attr-defined]


def test_stop_closes_the_stream(app_url: str, open_page: PageFactory, fake: FakeUpstream) -> None:
    fake.stall_closed.clear()
    page = open_page(app_url)
    sign_up(page, "alice")
    send(page, "#hang until stopped")  # the service takes the request and says nothing yet
    expect(page.locator(".status-line")).to_have_text("Waiting for the model…")
    page.click(".composer .send")
    expect(last_answer(page).locator(".msg-note")).to_have_text("Stopped.")

    send(page, "#stall then wait")
    expect(last_answer(page)).to_contain_text("partial")
    expect(page.locator(".status-line")).to_have_text("Generating…")
    expect(page.locator(".composer .send")).to_have_text("Stop")
    page.click(".composer .send")
    assert fake.stall_closed.wait(10), "the model service's request was not closed"
    expect(last_answer(page).locator(".msg-note")).to_have_text("Stopped.")
    expect(page.locator(".composer .send")).to_have_text("Send")
    expect(page.locator(".status-line")).to_have_text("")


def test_service_errors_are_readable_and_retried(
    app_url: str, open_page: PageFactory, fake: FakeUpstream
) -> None:
    page = open_page(app_url)
    sign_up(page, "alice")
    send(page, "#503 please")
    error = last_answer(page).locator(".msg-error")
    expect(error).to_contain_text("unavailable right now")
    asked = len(fake.requests)
    error.locator(".retry").click()  # regenerates: the service is asked again
    expect(last_answer(page).locator(".msg-error")).to_be_visible()
    assert len(fake.requests) == asked + 1
    expect(page.locator(".msg-assistant")).to_have_count(1)  # the failed answer was replaced

    # edit the message and resend it: this time it works
    page.locator(".msg-user .edit").click()
    page.fill(".edit-input", "fine now")
    page.click(".save-edit")
    expect(last_answer(page).locator(".msg-body")).to_contain_text("fine now")
    expect(page.locator(".msg-error")).to_have_count(0)


def test_a_second_user_sees_none_of_the_first_users_conversations(
    app_url: str, open_page: PageFactory
) -> None:
    alice = open_page(app_url)
    sign_up(alice, "alice")
    send(alice, "alice's secret plan")
    expect(last_answer(alice)).to_contain_text("secret plan")
    alice_url = alice.url
    conversation_id = alice_url.rsplit("/", 1)[1]

    bob = open_page(app_url)
    sign_up(bob, "bob")
    expect(bob.locator(".conv-empty")).to_be_visible()
    expect(bob.locator(".admin-link")).to_be_hidden()
    bob.goto(alice_url)  # her conversation's address: bob lands on a new chat of his own
    expect(bob.locator(".hello")).to_be_visible()
    expect(bob.locator("body")).not_to_contain_text("secret plan")
    assert bob.request.get(f"{app_url}/api/conversations/{conversation_id}").status == 404


def test_a_malicious_answer_is_sanitized(app_url: str, open_page: PageFactory) -> None:
    page = open_page(app_url)
    sign_up(page, "alice")
    payload = (
        "<img src=x onerror=alert(1)> <script>alert(2)</script> "
        '<a href="javascript:alert(3)">click</a> <svg onload=alert(4)></svg> '
        '<iframe src="javascript:alert(5)"></iframe> [md](javascript:alert(6))'
    )
    send(page, payload)
    body = last_answer(page).locator(".msg-body")
    expect(body).to_contain_text("echo")
    expect(last_answer(page).locator(".msg-actions .regenerate")).to_be_visible()  # done
    assert body.locator("script, iframe, [onerror], [onload]").count() == 0
    hrefs = body.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert not any(h and h.lower().startswith("javascript") for h in hrefs), hrefs
    page.locator("a:has-text('click')").first.click(no_wait_after=True)  # nothing to run
    page.reload()  # the stored answer renders through the same sanitizer
    page.click(".conv-link")
    expect(last_answer(page).locator(".msg-body")).to_contain_text("echo")
    assert page.dialogs == [], page.dialogs  # type: ignore[attr-defined]
    assert page.errors == []  # type: ignore[attr-defined]


def test_language_follows_the_browser_and_can_be_switched(
    app_url: str, open_page: PageFactory
) -> None:
    page = open_page(app_url, locale="zh-CN")
    expect(page.locator(".auth-form h2")).to_have_text("登录")
    sign_up(page, "alice")
    expect(page.locator(".composer .send")).to_have_text("发送")
    page.select_option(".lang-select", "en")
    expect(page.locator(".composer .send")).to_have_text("Send")
    expect(page.locator(".new-chat")).to_have_text("New chat")
    page.reload()  # remembered
    expect(page.locator(".new-chat")).to_have_text("New chat")
    page.select_option(".lang-select", "zh")
    expect(page.locator(".new-chat")).to_have_text("新对话")
    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")


def test_admin_adds_and_disables_a_user(make_app: AppFactory, open_page: PageFactory) -> None:
    url = make_app()
    admin = open_page(url)
    sign_up(admin, "alice")
    admin.click(".admin-link")
    admin.fill(".add-user input[name=username]", "carol")
    admin.fill(".add-user input[name=password]", PASSWORD)
    admin.click(".add-user button[type=submit]")
    carol_row = admin.locator("tr[data-user=carol]")
    expect(carol_row).to_contain_text("active")
    admin.click(".signup-open")  # sign-up off
    expect(admin.locator(".form-message")).to_have_text("Saved.")
    expect(admin.locator(".rewrite-queries")).not_to_be_checked()  # off by default
    with admin.expect_response(lambda r: r.url.endswith("/api/admin/settings")):
        admin.click(".rewrite-queries")
    admin.reload()  # kept by the server
    expect(admin.locator(".rewrite-queries")).to_be_checked()
    expect(admin.locator(".signup-open")).not_to_be_checked()

    carol = open_page(url)
    expect(carol.locator(".auth-form .hint")).to_be_visible()  # sign-up closed: no link
    expect(carol.locator(".switch-auth")).to_have_count(0)
    log_in(carol, "carol")
    carol_row.locator(".toggle-disabled").click()
    expect(carol_row).to_contain_text("disabled")
    carol.reload()  # her session ended with the account
    expect(carol.locator(".auth-form.login")).to_be_visible()


def test_search_rename_and_delete_conversations(app_url: str, open_page: PageFactory) -> None:
    page = open_page(app_url)
    sign_up(page, "alice")
    for text in ("about penguins", "about volcanoes"):
        page.click(".new-chat")
        expect(page.locator(".hello")).to_be_visible()
        send(page, text)
        expect(last_answer(page).locator(".msg-actions .regenerate")).to_be_visible()
    links = page.locator(".conv-link")
    expect(links).to_have_text(["about volcanoes", "about penguins"])  # newest first
    page.fill(".conv-search", "penguin")
    expect(links).to_have_text(["about penguins"])
    page.fill(".conv-search", "")
    expect(links).to_have_count(2)

    penguins = page.locator(".conv", has_text="penguins")
    penguins.hover()  # the item's buttons show on hover
    penguins.locator(".rename").click()
    page.fill(".rename-input", "Birds of the south")
    page.press(".rename-input", "Enter")
    expect(links).to_have_text(["Birds of the south", "about volcanoes"])  # renamed is newest

    page.accept_dialogs = True  # type: ignore[attr-defined]
    volcanoes = page.locator(".conv", has_text="volcanoes")
    volcanoes.hover()
    volcanoes.locator(".delete").click()
    expect(links).to_have_text(["Birds of the south"])


def test_new_chat_while_the_first_message_creates_its_conversation(
    app_url: str, open_page: PageFactory
) -> None:
    # the conversation's creation is held in the browser, so the page is caught in the moment
    # between Enter and the stream: it must already be busy, and "New chat" must leave it
    page = open_page(app_url)
    sign_up(page, "alice")
    held: list[Route] = []

    def hold_creation(route: Route) -> None:
        held.append(route) if route.request.method == "POST" else route.continue_()

    page.route("**/api/conversations", hold_creation)
    send(page, "about penguins")
    page.wait_for_function("() => document.querySelector('.composer .send.stop') !== null")
    assert held, "the creation request was not made"
    expect(last_answer(page).locator(".msg-actions .regenerate")).to_be_hidden()
    expect(page.locator(".composer .send")).to_have_text("Stop")

    page.click(".new-chat")
    expect(page.locator(".hello")).to_be_visible()
    with page.expect_response(lambda r: r.url.endswith("/messages")):
        held[0].continue_()  # the old page's request now goes on: it must not move this page
    page.unroute("**/api/conversations")
    expect(page).to_have_url(re.compile(r"#/$"))
    expect(page.locator(".hello")).to_be_visible()
    page.reload()  # the first conversation was still made and answered
    expect(page.locator(".conv-link")).to_have_text(["about penguins"])
