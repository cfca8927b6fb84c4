"""Load generation: streaming chat requests over aiohttp, SSE parsing, closed and open loops.

aiohttp, not httpx: on the 2-core machine the client shares the CPU with the server it
measures, and httpx's streaming path cost ~110 us of client CPU per token against aiohttp's
~40 us (10% vs 4% of a core at 900 tok/s), which slowed every target by about 8%.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from tqdm import tqdm

from surge.bench.workloads import Prompt

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestResult:
    """What one streaming request measured (times in seconds, from its own start)."""

    ok: bool = False
    error: str | None = None
    start: float = 0.0  # perf_counter when sent
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)  # gaps between content chunks
    num_chunks: int = 0  # content chunks seen (the token count when usage is missing)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None  # prompt tokens the server found cached, when it says

    @property
    def tpot(self) -> float:
        """Time per output token after the first (0 for one-token answers)."""
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def sse_data(line: str) -> str | None:
    """The payload of an SSE `data:` line; None for comments, other fields and blank lines."""
    if not line.startswith("data:"):
        return None
    payload = line[5:]
    return payload[1:] if payload.startswith(" ") else payload


class StreamAccumulator:
    """Folds an OpenAI chat stream's payloads, with arrival times, into a RequestResult."""

    def __init__(self, start: float) -> None:
        self.result = RequestResult(start=start)
        self.done = False
        self._last: float | None = None

    def feed(self, payload: str, now: float) -> None:
        """One `data:` payload that arrived at `now` (perf_counter)."""
        r = self.result
        if payload.strip() == "[DONE]":
            self.done = True
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            err = chunk["error"]
            r.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            return
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content"):
                self._on_content(now)
        usage = chunk.get("usage")
        if usage:
            r.output_tokens = int(usage.get("completion_tokens") or 0)
            r.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if cached is not None:
                r.cached_tokens = int(cached)
        timings = chunk.get("timings")  # llama-server: cache_n prompt tokens reused, prompt_n run
        if timings and "cache_n" in timings:
            r.cached_tokens = int(timings["cache_n"])
            r.prompt_tokens = r.prompt_tokens or int(
                timings["cache_n"] + timings.get("prompt_n", 0)
            )

    def _on_content(self, now: float) -> None:
        r = self.result
        if self._last is None:
            r.ttft = now - r.start
        else:
            r.itls.append(now - self._last)
        self._last = now
        r.num_chunks += 1

    def finish(self, now: float) -> RequestResult:
        """Close the result: ok only for a stream that ended with [DONE] and no error."""
        r = self.result
        r.e2e = now - r.start
        if r.output_tokens == 0:  # no usage chunk: one token per content chunk
            r.output_tokens = r.num_chunks
        if r.error is None and not self.done:
            r.error = "stream ended without [DONE]"
        r.ok = r.error is None and r.num_chunks > 0
        if r.error is None and not r.ok:
            r.error = "no output"
        return r


@dataclass(frozen=True)
class RequestOptions:
    """How to talk to one target: where, which model, and which extra body fields it accepts."""

    base_url: str
    model: str
    extra_body: dict[str, object] = field(default_factory=dict)
    include_usage: bool = True
    temperature: float = 0.0
    timeout: float = 600.0


async def send_chat(
    session: aiohttp.ClientSession, opts: RequestOptions, prompt: Prompt
) -> RequestResult:
    """One streaming chat completion; never raises (failures become the result's error).

    A pooled keep-alive connection the server has already closed fails before any response
    ("Server disconnected", or "Can not write request body" when the close lands while the
    body is sent); such a request got no answer, so it is sent once more on a fresh connection,
    timed from the resend.
    """
    body: dict[str, object] = {
        "model": opts.model,
        "messages": prompt.to_messages(),
        "max_tokens": prompt.max_tokens,
        "temperature": opts.temperature,
        "stream": True,
        **opts.extra_body,
    }
    if opts.include_usage:
        body["stream_options"] = {"include_usage": True}
    url = opts.base_url + "/v1/chat/completions"
    result, stale = await _post_chat(session, url, body, opts.timeout)
    if stale:
        logger.debug("stale keep-alive connection (%s); resending once", result.error)
        # a new session: the pool's other idle connections may have been closed as well
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            result, _ = await _post_chat(s, url, body, opts.timeout)
    return result


async def _post_chat(
    session: aiohttp.ClientSession, url: str, body: dict[str, object], timeout_s: float
) -> tuple[RequestResult, bool]:
    """(result, whether the connection failed before any response) of one attempt."""
    acc = StreamAccumulator(time.perf_counter())
    responded = False
    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=30.0)
    try:
        async with session.post(url, json=body, timeout=timeout) as resp:
            responded = True
            if resp.status != 200:
                text = (await resp.read()).decode(errors="replace")[:300]
                acc.result.error = f"HTTP {resp.status}: {text}"
                return acc.finish(time.perf_counter()), False
            await read_events(resp, acc)
    except aiohttp.ClientConnectionError as exc:
        acc.result.error = f"{type(exc).__name__}: {exc}"
        return acc.finish(time.perf_counter()), not responded
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, OSError) as exc:
        acc.result.error = f"{type(exc).__name__}: {exc}"
    return acc.finish(time.perf_counter()), False


async def read_events(resp: aiohttp.ClientResponse, acc: StreamAccumulator) -> None:
    """Feed each SSE `data:` payload to acc, stamped with the arrival of the bytes that hold it."""
    pending = b""
    async for data in resp.content.iter_any():
        now = time.perf_counter()
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            payload = sse_data(line.decode(errors="replace").rstrip("\r"))
            if payload is not None:
                acc.feed(payload, now)
    payload = sse_data(pending.decode(errors="replace").rstrip("\r"))  # a last line with no newline
    if payload is not None:
        acc.feed(payload, time.perf_counter())


def make_session(max_connections: int) -> aiohttp.ClientSession:
    """A session sized for the load (keep-alive connections; each request sets its timeout)."""
    connector = aiohttp.TCPConnector(limit=max_connections)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


async def _prompt_source(
    prompts: list[Prompt], max_duration: float | None
) -> AsyncIterator[Prompt]:
    deadline = None if max_duration is None else time.perf_counter() + max_duration
    for prompt in prompts:
        if deadline is not None and time.perf_counter() >= deadline:
            return  # no new requests after the deadline; those in flight still finish
        yield prompt


async def run_closed_loop(
    opts: RequestOptions,
    prompts: list[Prompt],
    concurrency: int,
    max_duration: float | None = None,
    desc: str = "",
) -> tuple[list[RequestResult], float]:
    """`concurrency` users, each sending its next request when its last one ends; (results, s)."""
    results: list[RequestResult] = []
    source = _prompt_source(prompts, max_duration)
    lock = asyncio.Lock()  # one async generator, shared by all users

    async def user(session: aiohttp.ClientSession, bar: tqdm) -> None:
        while True:
            async with lock:
                prompt = await anext(source, None)
            if prompt is None:
                return
            results.append(await send_chat(session, opts, prompt))
            bar.update(1)

    async with make_session(concurrency + 4) as session:
        with tqdm(total=len(prompts), desc=desc, unit="req", disable=None, leave=False) as bar:
            start = time.perf_counter()
            await asyncio.gather(*(user(session, bar) for _ in range(concurrency)))
            return results, time.perf_counter() - start


async def run_open_loop(
    opts: RequestOptions,
    prompts: list[Prompt],
    request_rate: float,
    seed: int = 0,
    max_duration: float | None = None,
    desc: str = "",
) -> tuple[list[RequestResult], float]:
    """Poisson arrivals at `request_rate` req/s whatever the server's pace; (results, s)."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task[RequestResult]] = []
    async with make_session(1024) as session:
        with tqdm(total=len(prompts), desc=desc, unit="req", disable=None, leave=False) as bar:
            start = time.perf_counter()
            async for prompt in _prompt_source(prompts, max_duration):
                task = asyncio.create_task(send_chat(session, opts, prompt))
                task.add_done_callback(_updater(bar))
                tasks.append(task)
                await asyncio.sleep(rng.expovariate(request_rate))
            results = list(await asyncio.gather(*tasks))
            return results, time.perf_counter() - start


def _updater(bar: tqdm) -> Callable[[asyncio.Task[RequestResult]], None]:
    return lambda _task: bar.update(1)


async def warm_up(opts: RequestOptions, prompts: list[Prompt], num: int) -> None:
    """A few short requests first, so one-time costs (compilation, caches) stay out of the points."""
    if num <= 0:
        return
    short = [Prompt(p.messages, min(p.max_tokens, 16)) for p in prompts[:num]]
    results, _ = await run_closed_loop(opts, short, min(num, 2), desc="warm-up")
    failed = [r.error for r in results if not r.ok]
    if failed:
        logger.warning("%d of %d warm-up requests failed: %s", len(failed), num, failed[0])
