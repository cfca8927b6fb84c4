"""Screenshots of the web app for the README: chat and admin pages, in English and Chinese.

The app runs against a small canned model service (fixed answers, so the pictures are the same
each run), with a few users and conversations made over the REST API; Debian's Chromium (installed
with apt-get if missing, with a CJK font) takes the pictures through Playwright.

    python benchmarks/app_screenshots.py [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from playwright.sync_api import Page, sync_playwright

from surge.app.config import AppConfig
from surge.app.main import create_app

QUESTIONS = {
    "en": "How do I read a large file line by line in Python?",
    "zh": "用 Python 怎样逐行读取一个很大的文件？",
}
ANSWERS = {
    "en": """Iterate over the file object: Python reads it **lazily**, one line at a time, so \
memory stays flat even for a file of many gigabytes.

```python
from pathlib import Path

def count_errors(path: Path) -> int:
    count = 0
    with path.open(encoding="utf-8") as f:
        for line in f:  # one line in memory at a time
            if "ERROR" in line:
                count += 1
    return count
```

- Give `encoding="utf-8"` rather than relying on the platform's default.
- Use `line.rstrip("\\n")` when the trailing newline matters.
""",
    "zh": """直接遍历文件对象即可：Python 会**按需**一次读取一行，即使文件有几十 GB，内存占用也保持不变。

```python
from pathlib import Path

def count_errors(path: Path) -> int:
    count = 0
    with path.open(encoding="utf-8") as f:
        for line in f:  # 每次只在内存中保留一行
            if "ERROR" in line:
                count += 1
    return count
```

- 显式指定 `encoding="utf-8"`，不要依赖系统默认编码。
- 如果不需要行尾换行符，用 `line.rstrip("\\n")` 去掉。
""",
}
OTHER_TITLES = {
    "en": ["Summarize the Q3 incident report", "SQL: top customers by revenue", "Trip to Kyoto"],
    "zh": ["总结第三季度故障报告", "把这段话翻译成英文", "周末去杭州的行程"],
}
PASSWORD = "password123"


def canned_service() -> FastAPI:
    """An OpenAI-compatible chat service with fixed answers (Chinese for a Chinese question)."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        data = [{"id": "qwen2.5-7b-instruct", "object": "model", "kind": "chat"}]
        data.append({"id": "SmolLM2-135M-Instruct", "object": "model", "kind": "chat"})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        last = body["messages"][-1]["content"]
        lang = "zh" if any("\u4e00" <= c <= "\u9fff" for c in last) else "en"
        answer = ANSWERS[lang] if last in QUESTIONS.values() else f"({last})"

        async def stream() -> AsyncIterator[str]:
            for i in range(0, len(answer), 16):
                delta = {"choices": [{"delta": {"content": answer[i : i + 16]}}]}
                yield f"data: {json.dumps(delta)}\n\n"
            usage = {"prompt_tokens": 24 + len(last) // 3, "completion_tokens": len(answer) // 3}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


class Served:
    """An ASGI app under uvicorn on a free 127.0.0.1 port, in a thread."""

    def __init__(self, app: object) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))  # type: ignore[arg-type]
        threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True


def ensure_browser() -> str:
    """Debian's Chromium and a CJK font, installed with apt-get when missing."""
    missing = [] if Path("/usr/bin/chromium").exists() else ["chromium"]
    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True, check=False)
    if not fonts.stdout.strip():
        missing.append("fonts-wqy-microhei")
    if missing:
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True
        )
    return "/usr/bin/chromium"


class User:
    """One account over the REST API."""

    def __init__(self, base: str, name: str, signup: bool = True) -> None:
        self.http = httpx.Client(base_url=base, timeout=30)
        path = "/api/signup" if signup else "/api/login"
        resp = self.http.post(path, json={"username": name, "password": PASSWORD})
        resp.raise_for_status()
        self.headers = {"X-CSRF-Token": resp.json()["csrf_token"]}

    def call(self, method: str, path: str, body: object = None) -> httpx.Response:
        resp = self.http.request(method, path, json=body, headers=self.headers)
        resp.raise_for_status()
        return resp

    def chat(self, text: str, **settings: object) -> int:
        """A new conversation with one question answered; its id."""
        conv = self.call("POST", "/api/conversations", settings).json()["id"]
        path = f"/api/conversations/{conv}/messages"
        with self.http.stream("POST", path, json={"content": text}, headers=self.headers) as r:
            r.read()
        return conv


def seed(base: str) -> dict[str, int]:
    """alice (the admin) with conversations in both languages; bob and carol with some usage."""
    alice = User(base, "alice")
    for name in ("bob", "carol", "dmitri"):
        alice.call("POST", "/api/admin/users", {"username": name, "password": PASSWORD})
    for name, count in (("bob", 3), ("carol", 1)):
        user = User(base, name, signup=False)
        for i in range(count):
            user.chat(f"question {i}")
    alice.call("PATCH", "/api/admin/users/4", {"disabled": True})
    ids = {}
    for lang in ("en", "zh"):
        for title in OTHER_TITLES[lang]:
            conv = alice.chat(title)
            alice.call("PATCH", f"/api/conversations/{conv}", {"title": title})
        system = (
            "You are a concise Python expert." if lang == "en" else "你是一位简洁的 Python 专家。"
        )
        settings = {"system_prompt": system, "temperature": 0.3, "model": "qwen2.5-7b-instruct"}
        ids[lang] = alice.chat(QUESTIONS[lang], **settings)
    return ids


def shoot(page: Page, path: Path) -> None:
    page.wait_for_timeout(200)  # let the fonts settle after the last change
    page.screenshot(path=str(path))
    print(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/screenshots")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chromium = ensure_browser()
    service = Served(canned_service())
    data_dir = Path(tempfile.mkdtemp(prefix="surge-shots-"))
    app = Served(create_app(AppConfig(api_base=f"{service.url}/v1", data_dir=data_dir)))
    try:
        ids = seed(app.url)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-US")
            page = context.new_page()
            page.goto(app.url)
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", PASSWORD)
            page.click(".auth-form button[type=submit]")
            page.wait_for_selector(".composer-input")
            for lang in ("en", "zh"):
                page.select_option(".lang-select", lang)
                page.goto(f"{app.url}/#/c/{ids[lang]}")
                page.wait_for_selector(".msg-assistant pre code.hljs")
                if lang == "en":
                    page.click(".settings-toggle")  # the conversation's own settings, once
                shoot(page, out / f"chat-{lang}.png")
                page.goto(f"{app.url}/#/admin")
                page.wait_for_selector("tr[data-user=carol]")
                shoot(page, out / f"admin-{lang}.png")
            browser.close()
    finally:
        app.stop()
        service.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
