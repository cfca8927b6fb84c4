"""One generation request end to end: get the model (loading it on demand), prepare the prompt,
admit, run, and answer as an SSE stream or one JSON body."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from surge.engine.async_engine import AsyncEngine
from surge.engine.inputs import check_request_fits
from surge.engine.outputs import RequestOutput
from surge.engine.request import InvalidRequestError, SamplingParams
from surge.router import KeepAlive, Lease
from surge.server.admission import Ticket
from surge.server.auth import KeyInfo
from surge.server.protocol import APIError
from surge.server.responses import Renderer
from surge.server.state import ServerState
from surge.server.streaming import DONE, KEEPALIVE, engine_outputs, sse, stream_sse

_T = TypeVar("_T")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# engine -> (prompt token ids, renderer): tokenizing needs the loaded model's tokenizer
Prepare = Callable[[AsyncEngine], Awaitable[tuple[list[int], Renderer]]]


@dataclass(slots=True)
class GenerationCall:
    """What a route hands over: who asks, for which model, what to run."""

    request: Request
    state: ServerState
    key: KeyInfo
    model: str
    keep_alive: float | None | KeepAlive
    prepare: Prepare
    params: SamplingParams
    stream: bool
    priority: int | None
    arrival: float
    session: str | None = None  # routes this client's requests to one replica (affinity)


async def generate(call: GenerationCall) -> Response:
    """Answer one generation request; a stream for a model not loaded yet opens at once and
    sends keep-alive comments while the model loads."""
    _check_priority(call.priority, call.key)
    state = call.state
    if state.draining:
        raise state.admission.reject(503, "draining", "the server is shutting down")
    if call.stream and not state.is_loaded(call.model) and not state.fails_fast(call.model):
        return StreamingResponse(
            _cold_stream(call), media_type="text/event-stream", headers=SSE_HEADERS
        )
    lease = await state.acquire(call.model, call.keep_alive)
    ticket, renderer, prompt_ids = await _admit(call, lease)
    engine = ticket.engine
    assert engine is not None
    keepalive = state.config.keepalive_interval if call.stream else None
    outputs = engine_outputs(engine, ticket, prompt_ids, call.params, keepalive)
    if call.stream:
        body = stream_sse(outputs, renderer, call.params.n, state.admission, ticket)
        # a body the server never starts (client gone first) still gives its slot back
        weakref.finalize(body, state.admission.release, ticket)
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        last = await _until_disconnect(call.request, _collect(outputs, ticket))
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]
        state.admission.release(ticket)
    if last is None:  # the client left; nobody reads this
        return Response(status_code=499)
    return JSONResponse(renderer.response(last))


async def _admit(call: GenerationCall, lease: Lease) -> tuple[Ticket, Renderer, list[int]]:
    """Prepare the prompt and admit the request on the leased model; the lease goes back on
    any refusal, else with the ticket."""
    state = call.state
    try:
        engine = state.chat_engine(lease)
        prompt_ids, renderer = await call.prepare(engine)
        # a request the engine could never finish is a 400 now, not a failure after it queued
        check_request_fits(prompt_ids, call.params.max_tokens, engine.limits)
        max_num_seqs = engine.max_num_seqs
        most = max_num_seqs + state.config.max_queue
        if call.params.n > most:
            raise APIError(
                400,
                f"n={call.params.n} can never be admitted: this model runs and queues {most} "
                "sequences at most",
                param="n",
            )
        ticket = state.admission.admit(
            renderer.req_id,
            call.key,
            len(prompt_ids),
            call.params.n,
            call.priority,
            call.arrival,
            model=call.model,
            max_num_seqs=max_num_seqs,
        )
    except BaseException:
        lease.release()
        raise
    ticket.engine, ticket.lease, ticket.session = engine, lease, call.session
    return ticket, renderer, prompt_ids


async def _cold_stream(call: GenerationCall) -> AsyncIterator[str]:
    """The SSE body of a request whose model must load first: keep-alive comments while it
    loads (the wait counts against --queue-timeout), then the stream as usual."""
    state = call.state
    task = asyncio.ensure_future(state.acquire(call.model, call.keep_alive))
    handed_over = False
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=state.config.keepalive_interval)
            if not task.done():
                yield KEEPALIVE
        handed_over = True  # _admit owns the lease from here, and gives it back on refusal
        ticket, renderer, prompt_ids = await _admit(call, task.result())
    except (APIError, InvalidRequestError) as e:
        error = e if isinstance(e, APIError) else APIError(400, str(e), param=e.param)
        yield sse(error.body())
        yield DONE
        return
    finally:
        if not task.done():
            task.cancel()  # the client left while the model loaded (the load itself goes on)
        elif not handed_over and not task.cancelled() and task.exception() is None:
            task.result().release()
    engine = ticket.engine
    assert engine is not None
    outputs = engine_outputs(
        engine, ticket, prompt_ids, call.params, state.config.keepalive_interval
    )
    async for chunk in stream_sse(outputs, renderer, call.params.n, state.admission, ticket):
        yield chunk


def _check_priority(priority: int | None, key: KeyInfo) -> None:
    """A request may ask for its key's priority or a worse (higher) one, never a better one."""
    if priority is not None and priority < key.priority:
        raise APIError(
            400,
            f"priority {priority} is better than this API key's ({key.priority}); "
            "lower values run first, and a request may not go below its key's",
            param="priority",
        )


# Above this many characters, tokenizing (and chat templating) runs on a worker thread so one
# large prompt doesn't stall every other user's stream on the event loop.
OFF_LOOP_CHARS = 16_384


async def off_loop_if_large(
    size: int, fn: Callable[..., _T], /, *args: object, **kwargs: object
) -> _T:
    if size > OFF_LOOP_CHARS:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


async def chat_prompt_ids(engine: AsyncEngine, messages: list[dict[str, str]]) -> list[int]:
    """The chat template's token ids; 400 if the template refuses these messages."""
    size = sum(len(m["content"]) for m in messages)
    try:
        return await off_loop_if_large(size, engine.tokenizer.apply_chat_template, messages)
    except ValueError as e:  # no chat template, or one that refuses these messages
        raise APIError(400, str(e), param="messages") from e
    except Exception as e:  # noqa: BLE001 - a template that raises on odd input is the input's fault
        raise APIError(
            400, f"the chat template failed on these messages: {e}", param="messages"
        ) from e


async def _collect(outputs: AsyncIterator[RequestOutput | None], ticket: Ticket) -> RequestOutput:
    """The final output of a non-streaming request; APIError if it failed."""
    last: RequestOutput | None = None
    async for out in outputs:
        if out is not None:
            last = out
    if last is None or not last.finished:  # (a passed deadline raised in engine_outputs)
        ticket.outcome = "abort"
        raise APIError(
            503, "the request was aborted (server shutting down)", type="service_unavailable"
        )
    if last.error:
        ticket.outcome = "error"
        raise APIError(
            500, f"generation failed: {last.error}", type="server_error", code="engine_error"
        )
    reasons = {c.finish_reason for c in last.outputs}
    ticket.outcome = next((r for r in ("abort", "length") if r in reasons), "stop")
    return last


async def _until_disconnect(
    request: Request, work: Coroutine[object, object, RequestOutput]
) -> RequestOutput | None:
    """Run `work` unless the client disconnects first (then cancel it, which aborts the request)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
        await asyncio.wait({task, gone})
    return None if task.cancelled() else task.result()


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
