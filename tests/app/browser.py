"""A real browser for the app's tests: Debian's Chromium driven by Playwright.

The project installs the browser itself: `/usr/bin/chromium` if it is there, else
`apt-get install -y chromium` (as root, non-interactive). Playwright (the `playwright` package of
the [test] extra) drives it through `executable_path`; `playwright install` (a browser download)
is never run. Where neither is possible the browser tests skip and say why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.apt import apt_install

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Dialog, Page

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def _found() -> str | None:
    return next((p for p in CHROMIUM_PATHS if Path(p).exists()), None)


def chromium_path() -> str:
    """Debian's Chromium, installed if missing; pytest.skip with the reason if it can't be."""
    found = _found()
    if found:
        return found
    problem = apt_install("chromium")
    found = _found()
    if found is None:
        pytest.skip(f"no Chromium at {CHROMIUM_PATHS[0]} and it can't be installed: {problem}")
    return found


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """One headless Chromium per test module (each test opens its own contexts). Not per
    session: Playwright's sync API keeps an event loop running on this thread while it is up,
    and every later test that calls asyncio.run() would fail."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package (the [test] extra) is missing"
    )
    path = chromium_path()
    with sync_api.sync_playwright() as playwright:
        # as root, Chromium's sandbox can't start; the pages are our own test app
        browser = playwright.chromium.launch(
            executable_path=path, headless=True, args=["--no-sandbox"]
        )
        yield browser
        browser.close()


PageFactory = Callable[..., "Page"]


@pytest.fixture
def open_page(chromium: Browser) -> Iterator[PageFactory]:
    """New pages, each in its own browser context (its own cookies: one user each). Any
    dialog (alert, confirm) is recorded on `page.dialogs` and dismissed (accepted once a test
    sets `page.accept_dialogs`); page errors are recorded on `page.errors`."""
    contexts = []

    def new(url: str, locale: str = "en-US") -> Page:
        context = chromium.new_context(locale=locale)
        context.set_default_timeout(10_000)
        contexts.append(context)
        page = context.new_page()
        page.dialogs = []  # type: ignore[attr-defined]
        page.errors = []  # type: ignore[attr-defined]
        page.accept_dialogs = False  # type: ignore[attr-defined]

        def on_dialog(dialog: Dialog) -> None:
            page.dialogs.append(dialog.message)  # type: ignore[attr-defined]
            dialog.accept() if page.accept_dialogs else dialog.dismiss()  # type: ignore[attr-defined]

        page.on("dialog", on_dialog)
        page.on("pageerror", lambda e: page.errors.append(str(e)))  # type: ignore[attr-defined]
        page.goto(url)
        return page

    yield new
    for context in contexts:
        context.close()
