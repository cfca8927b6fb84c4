"""The OpenAI routes: chat and text completions (streaming and not), models, tokenize/detokenize."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response

from surge.engine.async_engine import AsyncEngine
from surge.engine.inputs import check_request_fits
from surge.engine.request import SamplingParams
from surge.router import ModelKind, ModelState
from surge.server.generation import (
    GenerationCall,
    Prepare,
    chat_prompt_ids,
    generate,
    off_loop_if_large,
)
from surge.server.models import ChatHandle
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
from surge.server.state import KeyDep, StateDep, request_keep_alive

router = APIRouter()

_MODEL_TYPES = {ModelKind.CHAT: "LLM", ModelKind.EMBEDDING: "embedding", ModelKind.RERANK: "rerank"}
_ABILITIES = {
    ModelKind.CHAT: ["chat", "generate"],
    ModelKind.EMBEDDING: ["embed"],
    ModelKind.RERANK: ["rerank"],
}


@router.post("/v1/chat/completions", operation_id="create_chat_completion")
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: StateDep, key: KeyDep
) -> Response:
    """Reply to a conversation, formatted with the model's chat template."""
    arrival = time.monotonic()
    model = state.resolve(body.model, ModelKind.CHAT, key)
    params = body.to_sampling_params()

    async def prepare(engine: AsyncEngine) -> tuple[list[int], Renderer]:
        prompt_ids = await chat_prompt_ids(engine, body.template_messages())
        renderer = Renderer(
            "chat",
            f"chatcmpl-{uuid.uuid4().hex}",
            model,
            engine.tokenizer,
            params.logprobs,
            body.include_usage,
        )
        return prompt_ids, renderer

    return await _generate(body, request, state, key, model, params, prepare, arrival)


@router.post("/v1/completions", operation_id="create_completion")
async def create_completion(
    body: CompletionRequest, request: Request, state: StateDep, key: KeyDep
) -> Response:
    """Continue one prompt (text or token ids)."""
    arrival = time.monotonic()
    model = state.resolve(body.model, ModelKind.CHAT, key)
    params = body.to_sampling_params()
    prompt = body.single_prompt()

    async def prepare(engine: AsyncEngine) -> tuple[list[int], Renderer]:
        size = len(prompt) if isinstance(prompt, str) else 0
        text, prompt_ids = await off_loop_if_large(size, engine.encode_prompt, prompt)
        echo = ""
        if body.echo and text is None:  # token ids are checked before they are decoded
            check_request_fits(prompt_ids, params.max_tokens, engine.limits)
            echo = engine.tokenizer.decode(prompt_ids)
        elif body.echo:
            echo = text
        renderer = Renderer(
            "completion",
            f"cmpl-{uuid.uuid4().hex}",
            model,
            engine.tokenizer,
            params.logprobs,
            body.include_usage,
            echo_prompt=echo,
        )
        return prompt_ids, renderer

    return await _generate(body, request, state, key, model, params, prepare, arrival)


# A client names its session (conversation) here, or in the request's `user` field: its requests
# then prefer one replica, whose prefix cache holds the conversation so far.
SESSION_HEADER = "x-session-id"


async def _generate(
    body: ChatCompletionRequest | CompletionRequest,
    request: Request,
    state: StateDep,
    key: KeyDep,
    model: str,
    params: SamplingParams,
    prepare: Prepare,
    arrival: float,
) -> Response:
    keep_alive = request_keep_alive(body.keep_alive)
    call = GenerationCall(
        request,
        state,
        key,
        model,
        keep_alive,
        prepare,
        params,
        body.stream,
        body.priority,
        arrival,
        session=request.headers.get(SESSION_HEADER) or body.user,
    )
    return await generate(call)


@router.get("/v1/models", operation_id="list_models")
async def list_models(state: StateDep, key: KeyDep) -> ModelList:
    """Every registered model, with its kind and state (loaded, loading, unloaded, failed)."""
    cards = []
    for name, status in state.registry.states().items():
        if key.models is not None and name not in key.models:
            continue
        model_state, reason = status.state.value, status.reason
        handle = state.registry.handle(name)
        if isinstance(handle, ChatHandle) and handle.engine.breaker_open:
            model_state, reason = (
                "failed",
                f"engine crashed too often: {handle.engine.last_failure}",
            )
        cards.append(
            ModelCard(
                id=name,
                max_model_len=_max_len(state, name),
                kind=status.kind.value,
                state=model_state,
                reason=reason,
                pinned=status.pinned,
                keep_alive=status.keep_alive,
                model_type=_MODEL_TYPES[status.kind],
                model_ability=_ABILITIES[status.kind],
            )
        )
    return ModelList(data=cards)


def _max_len(state: StateDep, name: str) -> int | None:
    handle = state.registry.handle(name)
    if isinstance(handle, ChatHandle):
        return handle.engine.limits.max_model_len
    info = getattr(handle, "info", None)
    return getattr(info, "max_seq_length", None)


async def _loaded_engine(state: StateDep, key: KeyDep, model: str | None) -> AsyncEngine:
    """The engine of a chat model for tokenize/detokenize (which never load one: 503 if not)."""
    name = state.resolve(model, ModelKind.CHAT, key)
    handle = state.registry.handle(name)
    if (
        not isinstance(handle, ChatHandle)
        or state.registry.status(name).state is not ModelState.LOADED
    ):
        raise APIError(
            503, f"model {name!r} is not loaded", type="service_unavailable", code="not_loaded"
        )
    if not handle.engine.is_ready:
        raise APIError(503, "the engine is restarting; retry shortly", type="service_unavailable")
    return handle.engine


@router.post("/tokenize", operation_id="tokenize")
async def tokenize(body: TokenizeRequest, state: StateDep, key: KeyDep) -> dict[str, object]:
    """Token ids of a prompt, or of chat messages after the chat template (vLLM's shape)."""
    engine = await _loaded_engine(state, key, body.model)
    tok = engine.tokenizer
    if body.messages is not None:
        tokens = await chat_prompt_ids(engine, template_messages(body.messages))
    elif body.prompt is not None:
        tokens = await off_loop_if_large(
            len(body.prompt), tok.encode, body.prompt, add_special_tokens=body.add_special_tokens
        )
    else:
        raise APIError(400, "give either prompt or messages", param="prompt")
    return {"count": len(tokens), "max_model_len": engine.limits.max_model_len, "tokens": tokens}


@router.post("/detokenize", operation_id="detokenize")
async def detokenize(body: DetokenizeRequest, state: StateDep, key: KeyDep) -> dict[str, str]:
    """The text of token ids."""
    engine = await _loaded_engine(state, key, body.model)
    if any(not 0 <= t < engine.tokenizer.vocab_size for t in body.tokens):
        raise APIError(
            400, f"token ids must be in [0, {engine.tokenizer.vocab_size})", param="tokens"
        )
    return {"prompt": engine.tokenizer.decode(body.tokens)}
