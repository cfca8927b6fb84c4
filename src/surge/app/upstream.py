"""The model service as the app sees it: an OpenAI-compatible HTTP API, reached through one
shared httpx.AsyncClient. Every failure becomes an UpstreamError with a readable message."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import httpx

from surge.app.config import AppConfig

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 1024  # one per streaming answer in flight; the pool never queues a chat
MAX_ERROR_BODY = 64 * 1024

_STATUS_MESSAGES = {
    429: "The model service is busy (too many requests). Try again in a moment.",
    500: "The model service failed while answering.",
    502: "The model service is unreachable or answered badly.",
    503: "The model service is unavailable right now (overloaded or loading a model).",
    504: "The model service did not answer in time.",
}
_RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})


class UpstreamError(Exception):
    """A failed request to the model service: an HTTP-like status, a message fit for a person,
    whether trying again may work, and the service's Retry-After when it sent one."""

    def __init__(
        self, status: int, message: str, *, retryable: bool, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = retryable
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Delta:
    """New answer text."""

    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    """The service's token counts for the request (the last chunk, with include_usage)."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """The service sent bytes but no answer yet (an SSE comment: still queued)."""


ChatEvent = Delta | Usage | KeepAlive


def make_client(config: AppConfig) -> httpx.AsyncClient:
    """The one client the app shares: a short connect timeout, a long read timeout (a queued
    request may wait), and the service's key when configured."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = httpx.Timeout(
        connect=config.upstream_connect_timeout_s,
        read=config.upstream_read_timeout_s,
        write=30.0,
        pool=30.0,
    )
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=64)
    return httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits)


def error_from_status(status: int, body: bytes, retry_after: str | None) -> UpstreamError:
    """An UpstreamError from an HTTP error answer (the OpenAI error body's message if any)."""
    message = _STATUS_MESSAGES.get(status, f"The model service refused the request ({status}).")
    try:
        detail = json.loads(body)["error"]["message"]
        if isinstance(detail, str) and detail:
            message = f"{message} ({detail})" if status in _STATUS_MESSAGES else detail
    except (ValueError, KeyError, TypeError):
        pass
    seconds = None
    if retry_after is not None:
        try:
            seconds = float(retry_after)
        except ValueError:
            seconds = None
    return UpstreamError(status, message, retryable=status in _RETRYABLE, retry_after_s=seconds)


def error_from_exception(e: httpx.HTTPError, base: str) -> UpstreamError:
    """An UpstreamError from a transport failure (refused, timed out, dropped)."""
    if isinstance(e, httpx.TimeoutException):
        return UpstreamError(504, _STATUS_MESSAGES[504], retryable=True)
    if isinstance(e, httpx.ConnectError):
        return UpstreamError(
            502, f"The model service at {base} can't be reached ({e}).", retryable=True
        )
    return UpstreamError(502, f"The connection to the model service failed ({e}).", retryable=True)


class Upstream:
    """The model service's endpoints the app uses: /models and streaming /chat/completions."""

    def __init__(self, client: httpx.AsyncClient, api_base: str) -> None:
        self.client = client
        self.base = api_base.rstrip("/")

    async def chat_models(self) -> list[str]:
        """Ids of the chat models (a model without `kind` counts as chat)."""
        try:
            resp = await self.client.get(f"{self.base}/models")
        except httpx.HTTPError as e:
            raise error_from_exception(e, self.base) from e
        if resp.status_code >= 400:
            raise error_from_status(
                resp.status_code, resp.content[:MAX_ERROR_BODY], resp.headers.get("retry-after")
            )
        try:
            data = resp.json()["data"]
            return [m["id"] for m in data if m.get("kind", "chat") == "chat"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UpstreamError(502, _STATUS_MESSAGES[502], retryable=True) from e

    async def stream_chat(
        self, model: str, messages: list[dict[str, str]], temperature: float | None
    ) -> AsyncGenerator[ChatEvent, None]:
        """The answer as it streams. However this ends (done, error, the consumer cancelled or
        closed it), the HTTP request is closed, so the service aborts the generation."""
        body: dict[str, object] = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if temperature is not None:
            body["temperature"] = temperature
        try:
            async with self.client.stream(
                "POST", f"{self.base}/chat/completions", json=body
            ) as resp:
                if resp.status_code >= 400:
                    content = await _read_bounded(resp)
                    raise error_from_status(
                        resp.status_code, content, resp.headers.get("retry-after")
                    )
                async for line in resp.aiter_lines():
                    events = parse_line(line)
                    if events is None:
                        return
                    for event in events:
                        yield event
        except httpx.HTTPError as e:
            raise error_from_exception(e, self.base) from e


def parse_line(line: str) -> list[ChatEvent] | None:
    """The events of one SSE line of an OpenAI chat stream; None at `data: [DONE]`."""
    if line.startswith(":"):
        return [KeepAlive()]
    if not line.startswith("data:"):
        return []
    payload = line[5:].strip()
    if payload == "[DONE]":
        return None
    try:
        chunk = json.loads(payload)
    except ValueError as e:
        raise UpstreamError(502, _STATUS_MESSAGES[502], retryable=True) from e
    if not isinstance(chunk, dict):
        return []
    if "error" in chunk:
        err = chunk["error"] if isinstance(chunk["error"], dict) else {}
        message = str(err.get("message") or "no reason given")
        raise UpstreamError(500, f"The model service failed: {message}", retryable=True)
    events: list[ChatEvent] = []
    choices = chunk.get("choices") or []
    if choices and isinstance(choices[0], dict):
        text = (choices[0].get("delta") or {}).get("content")
        if text:
            events.append(Delta(text))
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        events.append(Usage(int(prompt or 0), int(completion or 0)))
    return events


async def _read_bounded(resp: httpx.Response) -> bytes:
    out = bytearray()
    async for part in resp.aiter_bytes():
        out += part
        if len(out) >= MAX_ERROR_BODY:
            break
    return bytes(out[:MAX_ERROR_BODY])
