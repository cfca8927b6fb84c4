"""Driving one request through the engine: deadlines, keep-alive ticks, abort on disconnect, SSE."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import anyio

from surge.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from surge.engine.outputs import RequestOutput
from surge.engine.request import InvalidRequestError, SamplingParams
from surge.server.admission import Admission, Ticket
from surge.server.protocol import APIError
from surge.server.responses import Renderer

logger = logging.getLogger(__name__)

_TIMEOUT_CODES = ("queue_timeout", "request_timeout")
KEEPALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"


# Line separators a client's line splitter may break on (Python's str.splitlines does, and
# so httpx's iter_lines): escaped in the JSON, which stays the same value.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(body: object) -> str:
    """One SSE event carrying a JSON body."""
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)
    return f"data: {text}\n\n"


async def engine_outputs(
    engine: AsyncEngine,
    ticket: Ticket,
    prompt_token_ids: list[int],
    params: SamplingParams,
    keepalive: float | None,
) -> AsyncIterator[RequestOutput | None]:
    """The engine's outputs for one request; None = a keep-alive tick (nothing new for a while).

    Raises RequestTimeout past a deadline. However this generator ends (finished, deadline,
    the consumer cancelled because the client left), the request is gone from the engine.
    """
    agen = engine.generate(
        ticket.req_id, prompt_token_ids, params, ticket.priority, session=ticket.session
    )
    pending: asyncio.Future[RequestOutput] | None = None
    finished = False
    try:
        while True:
            if pending is None:
                # __anext__ runs as its own task so a keep-alive tick never cancels it
                pending = asyncio.ensure_future(agen.__anext__())
            deadline, code = ticket.next_deadline()
            now = time.monotonic()
            wait = keepalive
            if deadline is not None:
                wait = (
                    max(0.0, deadline - now)
                    if wait is None
                    else min(wait, max(0.0, deadline - now))
                )
            done, _ = await asyncio.wait({pending}, timeout=wait)
            if pending in done:
                try:
                    out = pending.result()
                except StopAsyncIteration:
                    finished = True
                    return
                pending = None
                ticket.on_output(out)
                finished = out.finished
                if finished and ticket.aborted_for in _TIMEOUT_CODES:
                    raise ticket.timeout()  # the reaper saw the deadline first
                yield out
                if finished:
                    return
            elif deadline is not None and time.monotonic() >= deadline:
                ticket.outcome = "timeout"
                ticket.aborted_for = code
                raise ticket.timeout()
            else:
                yield None
    finally:
        # shielded: when the client leaves, Starlette cancels us and every await here would be
        # cancelled again before the abort reached the engine
        with anyio.CancelScope(shield=True):
            await _stop(engine, agen, pending, ticket.req_id, finished)


async def _stop(
    engine: AsyncEngine,
    agen: AsyncIterator[RequestOutput],
    pending: asyncio.Future[RequestOutput] | None,
    req_id: str,
    finished: bool,
) -> None:
    """End the engine generator (which aborts the request) and abort explicitly to be sure."""
    try:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.wait({pending})
        await agen.aclose()  # type: ignore[attr-defined]
        if not finished:
            await engine.abort(req_id)
    except Exception:  # noqa: BLE001 - cleanup must never turn into the client's error
        logger.exception("aborting request %s failed", req_id)


async def stream_sse(
    outputs: AsyncIterator[RequestOutput | None],
    renderer: Renderer,
    n: int,
    admission: Admission,
    ticket: Ticket,
) -> AsyncIterator[str]:
    """The SSE body: chunks, the final chunk(s), usage when asked, then [DONE] — errors included."""
    try:
        for chunk in renderer.first_chunks(n):
            yield sse(chunk)
        last: RequestOutput | None = None
        async for out in outputs:
            if out is None:
                yield KEEPALIVE
                continue
            last = out
            if out.finished and out.error:
                ticket.outcome = "error"
                yield sse(
                    APIError(
                        500,
                        f"generation failed: {out.error}",
                        type="server_error",
                        code="engine_error",
                    ).body()
                )
                yield DONE
                return
            for chunk in renderer.delta_chunks(out):
                yield sse(chunk)
        if last is not None:
            ticket.outcome = _outcome(last)
            if renderer.include_usage:
                yield sse(renderer.usage_chunk(last))
        yield DONE
    except APIError as e:  # a deadline, or the engine refusing input after the stream began
        yield sse(e.body())
        yield DONE
    except (EngineDeadError, EngineOverloadedError) as e:
        ticket.outcome = "error"
        yield sse(
            APIError(
                503, f"the engine is down: {e}", type="service_unavailable", code="engine_dead"
            ).body()
        )
        yield DONE
    except InvalidRequestError as e:
        ticket.outcome = "error"
        yield sse(APIError(400, str(e), param=e.param).body())
        yield DONE
    except Exception as e:  # noqa: BLE001 - never a cut connection: say what happened
        logger.exception("stream %s failed", ticket.req_id)
        ticket.outcome = "error"
        yield sse(APIError(500, f"internal error: {e}", type="server_error").body())
        yield DONE
    finally:
        with anyio.CancelScope(shield=True):  # see engine_outputs: the client may be gone
            await outputs.aclose()  # type: ignore[attr-defined]
        admission.release(ticket)


def _outcome(out: RequestOutput) -> str:
    """The request's finish reason for metrics and logs (the first non-normal one wins)."""
    reasons = [c.finish_reason or "abort" for c in out.outputs]
    for special in ("error", "abort", "length"):
        if special in reasons:
            return special
    return reasons[0] if reasons else "abort"
