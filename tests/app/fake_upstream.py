"""A scripted OpenAI-compatible model service for the app's tests.

The last user message picks the behaviour:
  "#429" / "#503"   an HTTP error with an OpenAI error body (429 with Retry-After: 2)
  "#hang"           never answers (the app's read timeout must fire)
  "#stall"          streams one delta, then waits until the client closes the connection
  "#midway"         streams one delta, then an error event
  anything else     "echo N: <text>" in three deltas, then usage and [DONE]
Every request body is recorded; `stall_closed` is set when a stalled stream's connection closes.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODELS = [
    {"id": "chat-a", "object": "model", "kind": "chat"},
    {"id": "embed-x", "object": "model", "kind": "embedding"},
    {"id": "rerank-y", "object": "model", "kind": "rerank"},
    {"id": "legacy-b", "object": "model"},  # no kind: a chat model
]


def _chunk(body: dict[str, object]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _delta(text: str) -> str:
    return _chunk({"object": "chat.completion.chunk", "choices": [{"delta": {"content": text}}]})


class FakeUpstream:
    """The fake service's app and what it saw (read from the test thread)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, object]] = []
        self.headers: list[dict[str, str]] = []
        self.stall_closed = threading.Event()
        self.num_answers = 0
        self.base_url = ""  # set once it is served
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, object]:
            return {"object": "list", "data": MODELS}

        @app.post("/v1/chat/completions", response_model=None)
        async def chat(request: Request) -> JSONResponse | StreamingResponse:
            body = await request.json()
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            last = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
            if last.startswith("#429"):
                return _error(429, "queue full", {"Retry-After": "2"})
            if last.startswith("#503"):
                return _error(503, "model is loading")
            if last.startswith("#hang"):
                while not await request.is_disconnected():  # no answer until the client leaves
                    await asyncio.sleep(0.05)
                return _error(499, "client gone")
            return StreamingResponse(self._stream(body, last), media_type="text/event-stream")

        return app

    async def _stream(self, body: dict[str, object], last: str) -> AsyncIterator[str]:
        yield _chunk({"choices": [{"delta": {"role": "assistant"}}]})
        if last.startswith("#stall"):
            try:
                yield _delta("partial ")
                await asyncio.Event().wait()
            finally:
                self.stall_closed.set()
        if last.startswith("#midway"):
            yield _delta("half an ")
            yield _chunk({"error": {"message": "engine failed", "type": "server_error"}})
            return
        self.num_answers += 1
        for text in (f"echo {self.num_answers}", ": ", last):
            yield _delta(text)
        prompt_tokens = sum(len(str(m["content"]).split()) for m in body["messages"])  # type: ignore[union-attr]
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 3}
        yield _chunk({"choices": [], "usage": usage})
        yield "data: [DONE]\n\n"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "server_error", "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)
