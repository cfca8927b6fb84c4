"""The OpenAI routes: chat and text completions (streaming and not), models, tokenize/detokenize."""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from surge.engine.async_engine import AsyncEngine
from surge.engine.inputs import check_request_fits
from surge.engine.outputs import RequestOutput
from surge.engine.request import SamplingParams
from surge.server.admission import Ticket
from surge.server.auth import KeyInfo
from surge.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    template_messages,
)
from surge.server.responses import Renderer
from surge.server.state import KeyDep, ServerState, StateDep
from surge.server.streaming import engine_outputs, stream_sse

router = APIRouter()
_T = TypeVar("_T")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/v1/chat/completions", operation_id="create_chat_completion")
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: StateDep, key: KeyDep
) -> Response:
    """Reply to a conversation, formatted with the model's chat template."""
    arrival = time.monotonic()
    engine = state.ready_engine()
    state.check_model(body.model)
    params = body.to_sampling_params()
    prompt_ids = await _chat_prompt_ids(engine, body.template_messages())
    renderer = Renderer(
        "chat",
        f"chatcmpl-{uuid.uuid4().hex}",
        state.model_name,
        engine.tokenizer,
        params.logprobs,
        body.include_usage,
    )
    return await _generate(
        request, state, key, renderer, prompt_ids, params, body.stream, body.priority, arrival
    )


@router.post("/v1/completions", operation_id="create_completion")
async def create_completion(
    body: CompletionRequest, request: Request, state: StateDep, key: KeyDep
) -> Response:
    """Continue one prompt (text or token ids)."""
    arrival = time.monotonic()
    engine = state.ready_engine()
    state.check_model(body.model)
    params = body.to_sampling_params()
    text, prompt_ids = await _off_loop_if_large(
        _text_size(body.single_prompt()), engine.encode_prompt, body.single_prompt()
    )
    check_request_fits(prompt_ids, params.max_tokens, engine.limits)  # before echo decodes them
    echo = (
        "" if not body.echo else (text if text is not None else engine.tokenizer.decode(prompt_ids))
    )
    renderer = Renderer(
        "completion",
        f"cmpl-{uuid.uuid4().hex}",
        state.model_name,
        engine.tokenizer,
        params.logprobs,
        body.include_usage,
        echo_prompt=echo,
    )
    return await _generate(
        request, state, key, renderer, prompt_ids, params, body.stream, body.priority, arrival
    )


@router.get("/v1/models", operation_id="list_models")
async def list_models(state: StateDep, key: KeyDep) -> ModelList:
    """The one model this server serves."""
    max_len = state.engine.limits.max_model_len if state.engine is not None else None
    return ModelList(data=[ModelCard(id=state.model_name, max_model_len=max_len)])


@router.post("/tokenize", operation_id="tokenize")
async def tokenize(body: TokenizeRequest, state: StateDep, key: KeyDep) -> dict[str, object]:
    """Token ids of a prompt, or of chat messages after the chat template (vLLM's shape)."""
    engine = state.ready_engine()
    state.check_model(body.model)
    tok = engine.tokenizer
    if body.messages is not None:
        tokens = await _chat_prompt_ids(engine, template_messages(body.messages))
    elif body.prompt is not None:
        tokens = await _off_loop_if_large(
            len(body.prompt), tok.encode, body.prompt, add_special_tokens=body.add_special_tokens
        )
    else:
        raise APIError(400, "give either prompt or messages", param="prompt")
    return {"count": len(tokens), "max_model_len": engine.limits.max_model_len, "tokens": tokens}


@router.post("/detokenize", operation_id="detokenize")
async def detokenize(body: DetokenizeRequest, state: StateDep, key: KeyDep) -> dict[str, str]:
    """The text of token ids."""
    engine = state.ready_engine()
    state.check_model(body.model)
    if any(not 0 <= t < engine.tokenizer.vocab_size for t in body.tokens):
        raise APIError(
            400, f"token ids must be in [0, {engine.tokenizer.vocab_size})", param="tokens"
        )
    return {"prompt": engine.tokenizer.decode(body.tokens)}


async def _generate(
    request: Request,
    state: ServerState,
    key: KeyInfo,
    renderer: Renderer,
    prompt_ids: list[int],
    params: SamplingParams,
    stream: bool,
    priority: int | None,
    arrival: float,
) -> Response:
    """Admit, run and answer one generation request (an SSE stream or one JSON body)."""
    engine = state.ready_engine()
    # a request the engine could never finish is a 400 now, not a failure after it was queued
    check_request_fits(prompt_ids, params.max_tokens, engine.limits)
    _check_priority(priority, key)
    most = state.admission.max_num_seqs + state.config.max_queue
    if params.n > most:
        raise APIError(
            400,
            f"n={params.n} can never be admitted: this server runs and queues {most} sequences "
            "at most",
            param="n",
        )
    ticket = state.admission.admit(
        renderer.req_id, key, len(prompt_ids), params.n, priority, arrival
    )
    keepalive = state.config.keepalive_interval if stream else None
    outputs = engine_outputs(engine, ticket, prompt_ids, params, keepalive)
    if stream:
        body = stream_sse(outputs, renderer, params.n, state.admission, ticket)
        # a body the server never starts (client gone first) still gives its slot back
        weakref.finalize(body, state.admission.release, ticket)
        return StreamingResponse(body, media_type="text/event-stream", headers=_SSE_HEADERS)
    try:
        last = await _until_disconnect(request, _collect(outputs, ticket))
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]
        state.admission.release(ticket)
    if last is None:  # the client left; nobody reads this
        return Response(status_code=499)
    return JSONResponse(renderer.response(last))


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


def _text_size(prompt: str | list[int]) -> int:
    return len(prompt) if isinstance(prompt, str) else 0


async def _off_loop_if_large(
    size: int, fn: Callable[..., _T], /, *args: object, **kwargs: object
) -> _T:
    if size > OFF_LOOP_CHARS:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


async def _chat_prompt_ids(engine: AsyncEngine, messages: list[dict[str, str]]) -> list[int]:
    """The chat template's token ids; 400 if the template refuses these messages."""
    size = sum(len(m["content"]) for m in messages)
    try:
        return await _off_loop_if_large(size, engine.tokenizer.apply_chat_template, messages)
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
    if last is None or not last.finished:
        ticket.outcome = "abort"
        if ticket.aborted_for in ("queue_timeout", "request_timeout"):
            raise ticket.timeout()
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
