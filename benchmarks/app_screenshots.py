"""Screenshots of the web app for the README: chat, admin, knowledge-base and citation pages, in
English and Chinese.

The app runs against a small canned model service (fixed answers and deterministic embeddings,
so the pictures are the same each run), with a few users, conversations and knowledge bases made
over the REST API; Debian's Chromium (installed with apt-get if missing, with a CJK font) takes
the pictures through Playwright.

    python benchmarks/app_screenshots.py [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
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

KB_NAMES = {"en": "Observatory manuals", "zh": "天文台手册"}
KB_DESCRIPTIONS = {
    "en": "Operating and service manuals of the dome and the telescope",
    "zh": "圆顶与望远镜的操作和维护手册",
}
KB_DOCUMENTS = {
    "en": {
        "dome-service.md": """# Dome service manual

## Faults

Fault E-4471 means the dome motor has stalled. Switch the dome controller off, wait ten seconds
and switch it on again before you reset the dome.

## Rails and ice

In winter, ice on the rails stops the dome. Clear the ice from the rails before any reset.

## Cleaning

Wipe the mirror cover with a dry cloth once a month.
""",
        "visitors.txt": "Public nights are on the first Saturday of each month. Visitors meet at "
        "the library at nine.",
        "telescope.html": "<html><body><h1>Telescope</h1><h2>Cooling</h2><p>Open the mirror cover "
        "an hour before observing so the mirror cools to the night air.</p></body></html>",
    },
    "zh": {
        "圆顶维护手册.md": """# 圆顶维护手册

## 故障

故障 E-4471 表示圆顶电机卡住了。先关闭圆顶控制器，等待十秒后再打开，然后再复位圆顶。

## 导轨结冰

冬天导轨上的冰会让圆顶停转。复位之前，先清除导轨上的冰。

## 清洁

每月用干布擦拭一次镜盖。
""",
        "参观须知.txt": "每月第一个星期六晚上对公众开放。参观者九点在图书馆集合。",
        "望远镜.html": "<html><body><h1>望远镜</h1><h2>降温</h2><p>观测前一小时打开镜盖，"
        "让主镜降到夜间气温。</p></body></html>",
    },
}
KB_QUESTIONS = {"en": "What does fault E-4471 mean?", "zh": "故障 E-4471 是什么意思？"}
KB_ANSWERS = {
    "en": "Fault **E-4471** means the dome motor has stalled [1]. Switch the dome controller off, "
    "wait ten seconds and switch it on again before you reset the dome [1].",
    "zh": "故障 **E-4471** 表示圆顶电机卡住了 [1]。先关闭圆顶控制器，等待十秒后再打开，然后再复位"
    "圆顶 [1]。",
}
EMBED_DIM = 256
_WORDS = re.compile(r"[\u4e00-\u9fff]|[a-z0-9-]+")


def embed(texts: list[str]) -> list[list[float]]:
    """Hashed bags of words (Chinese by character): deterministic vectors, no model."""
    vectors = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in _WORDS.findall(text.lower()) or ["<empty>"]:
            vectors[row, zlib.crc32(word.encode()) % EMBED_DIM] += 1.0
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.tolist()


def canned_service() -> FastAPI:
    """An OpenAI-compatible chat service with fixed answers (Chinese for a Chinese question)."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        data = [{"id": "qwen2.5-7b-instruct", "object": "model", "kind": "chat"}]
        data.append({"id": "SmolLM2-135M-Instruct", "object": "model", "kind": "chat"})
        data.append({"id": "bge-m3", "object": "model", "kind": "embedding"})
        return {"object": "list", "data": data}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, object]:
        body = await request.json()
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        data = [
            {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(embed(texts))
        ]
        return {"object": "list", "data": data, "model": body["model"]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        last = body["messages"][-1]["content"]
        lang = "zh" if any("\u4e00" <= c <= "\u9fff" for c in last) else "en"
        answer = ANSWERS[lang] if last in QUESTIONS.values() else f"({last})"
        if any(last.endswith(q) for q in KB_QUESTIONS.values()):  # the RAG prompt ends with it
            answer = KB_ANSWERS[lang]

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


def seed_kb(alice: User, lang: str) -> tuple[int, int]:
    """A knowledge base of a few documents (ingested) and a conversation answering from it with
    citations: (kb id, conversation id)."""
    kb = alice.call(
        "POST",
        "/api/kbs",
        {"name": KB_NAMES[lang], "description": KB_DESCRIPTIONS[lang], "visibility": "shared_read"},
    ).json()["id"]
    files = [("files", (n, t.encode(), "text/plain")) for n, t in KB_DOCUMENTS[lang].items()]
    alice.http.post(
        f"/api/kbs/{kb}/documents", files=files, headers=alice.headers
    ).raise_for_status()
    with alice.http.stream("GET", f"/api/kbs/{kb}/documents/progress") as r:
        r.read()  # ends once every document has settled
    conv = alice.call("POST", "/api/conversations", {"model": "qwen2.5-7b-instruct"}).json()["id"]
    alice.call("PUT", f"/api/conversations/{conv}/kbs", {"kb_ids": [kb]})
    path = f"/api/conversations/{conv}/messages"
    body = {"content": KB_QUESTIONS[lang]}
    with alice.http.stream("POST", path, json=body, headers=alice.headers) as r:
        r.read()
    return kb, conv


def seed(base: str) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """alice (the admin) with conversations and a knowledge base in both languages; bob and
    carol with some usage. The chat conversations and the (kb, conversation) pairs by language."""
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
    kbs = {lang: seed_kb(alice, lang) for lang in ("en", "zh")}
    return ids, kbs


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
        ids, kbs = seed(app.url)
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
                kb, conv = kbs[lang]
                page.goto(f"{app.url}/#/kbs/{kb}")
                page.wait_for_selector(".doc-row[data-status=done]")
                page.fill(".retrieval-query", KB_QUESTIONS[lang])
                page.click(".retrieval-form button[type=submit]")
                page.wait_for_selector(".hit")
                page.set_viewport_size({"width": 1280, "height": 1240})  # the page and its hits
                shoot(page, out / f"kb-{lang}.png")
                page.set_viewport_size({"width": 1280, "height": 800})
                page.goto(f"{app.url}/#/c/{conv}")
                page.locator(".msg-assistant a.citation").first.click()
                page.wait_for_selector(".passage-panel .passage-text")
                shoot(page, out / f"citations-{lang}.png")
            browser.close()
    finally:
        app.stop()
        service.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
