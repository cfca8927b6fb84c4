"""A scripted OpenAI-compatible model service for the app's tests.

The last user message picks the behaviour:
  "#429" / "#503"   an HTTP error with an OpenAI error body (429 with Retry-After: 2)
  "#hang"           never answers (the app's read timeout must fire)
  "#stall"          streams one delta, then waits until the client closes the connection
  "#midway"         streams one delta, then an error event
  anything else     "echo N: <text>" in three deltas, then usage and [DONE]
A knowledge-base prompt (its system message asks for numbered passages) is answered with
KB_ANSWER, which cites [1] and a [9] no passage has (unless its question starts with "#").
A request to rewrite a follow-up as a standalone query is answered with `rewrite_reply` (which
may itself be "#503" etc.).
Every request body is recorded; `stall_closed` is set when a stalled stream's connection closes.

/v1/embeddings embeds deterministically (hashed bags of words, no model). An input containing
HOLD_MARKER is held, with `embed_held` set, until the test sets `embed_release`.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import zlib
from collections.abc import AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODELS = [
    {"id": "chat-a", "object": "model", "kind": "chat"},
    {"id": "embed-x", "object": "model", "kind": "embedding"},
    {"id": "rerank-y", "object": "model", "kind": "rerank"},
    {"id": "legacy-b", "object": "model"},  # no kind: a chat model
]


KB_ANSWER = "Fault E-4471 means the dome motor has stalled [1]. Spare parts are listed in [9]."
HOLD_MARKER = "holdembeddings"
EMBED_DIM = 512
_WORDS = re.compile(r"[\u4e00-\u9fff]|[a-z0-9-]+")


RERANK_MARKER = "RERANKTOP"  # /v1/rerank puts a document containing it first


def embed_texts(texts: list[str]) -> list[list[float]]:
    """Hashed bags of words (and Chinese characters): texts sharing words come out similar."""
    vectors = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in _WORDS.findall(text.lower()) or ["<empty>"]:
            vectors[row, zlib.crc32(word.encode()) % EMBED_DIM] += 1.0
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.tolist()


def _is_rewrite_prompt(messages: list[dict[str, str]]) -> bool:
    return bool(messages) and "standalone search query" in str(messages[0].get("content", ""))


def _is_kb_prompt(messages: list[dict[str, str]]) -> bool:
    return bool(messages) and "numbered passages" in str(messages[0].get("content", ""))


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
        self.embed_requests: list[dict[str, object]] = []
        self.rerank_requests: list[dict[str, object]] = []
        self.embed_held = threading.Event()
        self.embed_release = threading.Event()
        self.embed_release.set()
        self.num_answers = 0
        self.rewrite_reply = "#503"  # what a query rewrite gets (set by the test that asks)
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
            if _is_kb_prompt(body["messages"]):  # the question ends the RAG prompt
                last = last.rsplit("Question: ", 1)[-1]
                last = last if last.startswith("#") else KB_ANSWER
            if _is_rewrite_prompt(body["messages"]):
                last = self.rewrite_reply
                if not last.startswith("#"):
                    return StreamingResponse(self._reply(last), media_type="text/event-stream")
            if last.startswith("#429"):
                return _error(429, "queue full", {"Retry-After": "2"})
            if last.startswith("#503"):
                return _error(503, "model is loading")
            if last.startswith("#hang"):
                while not await request.is_disconnected():  # no answer until the client leaves
                    await asyncio.sleep(0.05)
                return _error(499, "client gone")
            return StreamingResponse(self._stream(body, last), media_type="text/event-stream")

        @app.post("/v1/embeddings")
        async def embeddings(request: Request) -> dict[str, object]:
            body = await request.json()
            self.embed_requests.append(body)
            texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
            if any(HOLD_MARKER in text for text in texts):
                self.embed_held.set()
                while not self.embed_release.is_set():
                    await asyncio.sleep(0.01)
            data = [
                {"object": "embedding", "index": i, "embedding": vector}
                for i, vector in enumerate(embed_texts(texts))
            ]
            return {"object": "list", "data": data, "model": body["model"]}

        @app.post("/v1/rerank")
        async def rerank(request: Request) -> dict[str, object]:
            # keeps the order it was given, except that a document with RERANK_MARKER goes first
            body = await request.json()
            self.rerank_requests.append(body)
            results = [
                {"index": i, "relevance_score": (1000.0 if RERANK_MARKER in doc else 0.0) - i}
                for i, doc in enumerate(body["documents"])
            ]
            results.sort(key=lambda r: -r["relevance_score"])
            return {"id": "rerank-1", "model": body["model"], "results": results}

        return app

    async def _reply(self, text: str) -> AsyncIterator[str]:
        """`text` as the whole answer, in one delta, with usage."""
        yield _delta(text)
        yield _chunk({"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 5}})
        yield "data: [DONE]\n\n"

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
