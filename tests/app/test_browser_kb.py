"""The knowledge-base pages in a real browser (Debian's Chromium under Playwright) against the
app and the scripted fake model service (which embeds, and answers a knowledge-base prompt with
KB_ANSWER: a real citation [1] and a [9] no passage has). Waits are for what the page shows."""

from __future__ import annotations

import re

import pytest

from tests.app.browser import PageFactory
from tests.app.conftest import AppFactory
from tests.app.fake_upstream import HOLD_MARKER, KB_ANSWER, FakeUpstream
from tests.app.test_browser import last_answer, send, sign_up

pytest.importorskip("playwright.sync_api", reason="the playwright package (the [test] extra)")
from playwright.sync_api import Page, expect  # noqa: E402

MANUAL = b"""# Dome service manual

## Faults

Fault E-4471 means the dome motor has stalled. Switch the dome controller off, wait ten
seconds, and switch it on again before you reset the dome.

## Cleaning

Wipe the mirror with a dry cloth once a month.

## Visitors

Public nights are on the first Saturday of each month.
"""  # three chunks: in a two-chunk corpus BM25 gives a word found in one of them idf 0
FAQ = b"# FAQ\n\nThe observatory opens at dusk on clear nights.\n"


def create_kb(page: Page, name: str, visibility: str = "private") -> int:
    """Create a knowledge base from the list page; its id (the page then shows it)."""
    page.click("a[href='#/kbs']")
    page.fill(".create-kb input[name=name]", name)
    page.select_option(".create-kb select[name=visibility]", visibility)
    page.click(".create-kb button[type=submit]")
    expect(page.locator(".kb-detail .kb-name")).to_have_text(name)
    return int(re.search(r"#/kbs/(\d+)$", page.url).group(1))  # type: ignore[union-attr]


def upload(page: Page, *files: tuple[str, bytes]) -> None:
    payload = [{"name": n, "mimeType": "text/markdown", "buffer": b} for n, b in files]
    page.set_input_files(".upload-input", payload)
    page.click(".upload-form button[type=submit]")


def test_kb_upload_ask_and_open_a_citation(app_url: str, open_page: PageFactory) -> None:
    page = open_page(app_url)
    sign_up(page, "alice")
    create_kb(page, "Dome manuals")
    expect(page.locator(".docs-empty")).to_be_visible()

    upload(page, ("manual.md", MANUAL), ("faq.md", FAQ), ("tool.exe", b"MZ\x90\x00"))
    results = page.locator(".upload-results")
    expect(results.locator("li[data-file='manual.md']")).to_contain_text("uploaded")
    expect(results.locator("li[data-file='tool.exe']")).to_contain_text("not a supported")
    rows = page.locator(".doc-row")
    expect(rows).to_have_count(2)
    # the progress stream brings the end of ingestion (no reload, no fixed wait)
    expect(page.locator(".doc-row[data-file='manual.md']")).to_have_attribute("data-status", "done")
    expect(page.locator(".doc-row[data-file='faq.md']")).to_have_attribute("data-status", "done")
    expect(page.locator(".doc-progress")).to_have_count(0)
    expect(page.locator(".doc-row[data-file='manual.md'] .status-cell")).to_have_text("done")

    upload(page, ("manual-copy.md", MANUAL))  # the same bytes again
    expect(results.locator("li.upload-duplicate")).to_contain_text("already holds")
    expect(rows).to_have_count(2)

    # the retrieval test shows the hit with where it is and its scores
    page.fill(".retrieval-query", "What does fault E-4471 mean?")
    page.click(".retrieval-form button[type=submit]")
    top = page.locator(".hit").first
    expect(top.locator(".hit-file")).to_have_text("manual.md")
    expect(top.locator(".hit-heading")).to_contain_text("Faults")
    expect(top.locator(".score-bm25 .score-value")).to_have_text(re.compile(r"^\d+\.\d{3}$"))
    expect(top.locator(".score-vector")).to_be_visible()
    expect(top).to_have_class(re.compile("relevant"))
    page.select_option(".lang-select", "zh")  # the page, results included, switches in place
    expect(page.locator(".retrieval-summary")).to_have_text(re.compile(r"^共 \d+ 个段落"))
    expect(top.locator(".badge")).to_have_text("相关")
    page.select_option(".lang-select", "en")

    # a conversation with the knowledge base attached answers with verified citations
    page.click("a[href='#/']")
    page.click(".kb-picker-toggle")
    page.locator(".kb-option", has_text="Dome manuals").locator("input").check()
    expect(page.locator(".kb-chip")).to_contain_text("Dome manuals")
    send(page, "What does fault E-4471 mean?")
    body = last_answer(page).locator(".msg-body")
    expect(body).to_contain_text("dome motor has stalled")
    link = body.locator("a.citation")
    expect(link).to_have_count(1)
    expect(link).to_have_text("[1]")
    expect(body).to_contain_text("[9]")  # unverified: shown, but as plain text
    assert body.locator("a", has_text="[9]").count() == 0
    link.click()
    panel = page.locator(".passage-panel")
    expect(panel).to_be_visible()
    expect(panel.locator(".passage-file")).to_have_text("manual.md")
    expect(panel.locator(".passage-heading")).to_contain_text("Faults")
    expect(panel.locator(".passage-text")).to_contain_text("Fault E-4471")
    expect(page).to_have_url(re.compile(r"#/c/\d+$"))  # the link did not route the page
    panel.locator(".close-passage").click()
    expect(panel).to_be_hidden()

    page.reload()  # the sources were saved with the answer
    body = last_answer(page).locator(".msg-body")
    expect(body.locator("a.citation")).to_have_text("[1]")
    assert body.locator("a", has_text="[9]").count() == 0
    expect(page.locator(".kb-chip")).to_contain_text("Dome manuals")
    body.locator(".sources .source").first.click()
    expect(page.locator(".passage-panel .passage-file")).to_have_text("manual.md")
    assert page.errors == []  # type: ignore[attr-defined]


def test_file_chat_attaches_a_file_to_one_conversation(
    app_url: str, open_page: PageFactory
) -> None:
    page = open_page(app_url)
    sign_up(page, "alice")
    payload = {"name": "notes.md", "mimeType": "text/markdown", "buffer": MANUAL}
    page.set_input_files(".attach-input", payload)  # a new chat: this makes the conversation
    chip = page.locator(".file-chip[data-file='notes.md']")
    expect(chip).to_have_attribute("data-status", "done")
    expect(page).to_have_url(re.compile(r"#/c/\d+$"))
    send(page, "What does fault E-4471 mean?")
    expect(last_answer(page).locator("a.citation")).to_have_text("[1]")
    assert KB_ANSWER.split(" [1]")[0] in last_answer(page).inner_text()
    page.click("a[href='#/kbs']")  # the conversation's own store is listed nowhere
    expect(page.locator(".kb-empty")).to_be_visible()


def test_a_second_user_cannot_see_a_private_kb(app_url: str, open_page: PageFactory) -> None:
    alice = open_page(app_url)
    sign_up(alice, "alice")
    secret = create_kb(alice, "Alice's secrets")
    create_kb(alice, "Team handbook", visibility="shared_read")

    bob = open_page(app_url, locale="zh-CN")  # and the pages in Chinese
    sign_up(bob, "bob")
    bob.click("a[href='#/kbs']")
    expect(bob.locator(".kb-page h2")).to_have_text("知识库")
    rows = bob.locator(".kb-row")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("Team handbook")
    expect(rows).to_contain_text("共享（只读）")
    expect(rows.locator(".delete-kb")).to_have_count(0)  # not his to delete
    bob.goto(f"{app_url}/#/kbs/{secret}")
    expect(bob.locator(".kb-missing")).to_be_visible()
    expect(bob.locator("body")).not_to_contain_text("Alice's secrets")
    bob.goto(f"{app_url}/#/")
    bob.click(".kb-picker-toggle")
    expect(bob.locator(".kb-option")).to_have_count(1)  # the shared one only
    assert bob.request.get(f"{app_url}/api/kbs/{secret}").status == 404


def test_cancel_reindex_delete_and_an_upload_over_the_limit(
    make_app: AppFactory, open_page: PageFactory, fake: FakeUpstream
) -> None:
    url = make_app(max_upload_bytes=4096)
    page = open_page(url)
    sign_up(page, "alice")
    create_kb(page, "Held")
    fake.embed_held.clear()
    fake.embed_release.clear()  # the document's embeddings wait: it stays processing
    try:
        upload(page, ("held.md", f"# Held\n\n{HOLD_MARKER} until released.\n".encode()))
        row = page.locator(".doc-row[data-file='held.md']")
        expect(row).to_have_attribute("data-status", "processing")
        expect(row.locator("progress.doc-progress")).to_be_visible()
        row.locator(".cancel-doc").click()
        expect(row).to_have_attribute("data-status", "cancelled")
        expect(row.locator(".status-cell")).to_have_text("cancelled")
    finally:
        fake.embed_release.set()
    row.locator(".reindex-doc").click()
    expect(row).to_have_attribute("data-status", "done")
    page.accept_dialogs = True  # type: ignore[attr-defined]
    row.locator(".delete-doc").click()
    expect(page.locator(".doc-row")).to_have_count(0)
    assert page.dialogs == ["Delete the document “held.md”?"]  # type: ignore[attr-defined]

    upload(page, ("big.md", b"x" * 5000))
    expect(page.locator(".upload-results")).to_contain_text("too large for this server (413)")

    page.click("a[href='#/kbs']")
    page.locator(".kb-row", has_text="Held").locator(".delete-kb").click()
    expect(page.locator(".kb-empty")).to_be_visible()
    assert page.errors == []  # type: ignore[attr-defined]
