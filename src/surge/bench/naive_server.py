"""The naive baseline: HF transformers `generate` behind FastAPI, one request at a time.

This is how LangServe/Chatchat-style apps serve a local model: a global lock around
`model.generate`, streaming through a `TextIteratorStreamer` from a generation thread. It loads
the very weights surge serves through surge's loader, so only the serving stack differs.
Run: `python -m surge.bench.naive_server [MODEL] --port 8001`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from surge.models.loader import ModelFiles, iter_weights, load_model_files
from surge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat request the baseline honours (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    messages: list[dict[str, str]]
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False


class PerTokenStreamer(TextIteratorStreamer):
    """Emits text after every token (the stock one waits for a space) and counts the tokens."""

    num_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        ids = value.reshape(-1).tolist()
        self.num_tokens += len(ids)
        self.token_cache.extend(ids)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            return
        self.on_finalized_text(text[self.print_len :])
        self.print_len = len(text)


class _Aborted(StoppingCriteria):
    """Stops `generate` once the client has gone, so the lock is not held for nobody."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> bool:
        return self.event.is_set()


def load_hf_model(files: ModelFiles, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' own implementation of the model, filled with surge's loaded weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(files.hf_config, dtype=dtype)
    missing, unexpected = model.load_state_dict(dict(iter_weights(files, dtype)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"naive baseline weights do not match: {missing=} {unexpected=}")
    model.tie_weights()
    return model.eval()


class NaiveState:
    """The model, its tokenizer and the one lock every request waits on."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, name: str) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.lock = asyncio.Lock()

    def start_generate(
        self, req: ChatRequest, stop: threading.Event
    ) -> tuple[PerTokenStreamer, threading.Thread, int]:
        """Start `model.generate` in a thread; (streamer, thread, prompt length)."""
        ids = self.tokenizer.apply_chat_template(req.messages)
        hf_tok = self.tokenizer.hf_tokenizer
        streamer = PerTokenStreamer(hf_tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "max_new_tokens": req.max_tokens,
            "min_new_tokens": req.max_tokens if req.ignore_eos else 0,
            "do_sample": req.temperature > 0,
            "eos_token_id": list(self.tokenizer.eos_token_ids),
            "pad_token_id": hf_tok.pad_token_id or self.tokenizer.eos_token_ids[0],
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_Aborted(stop)]),
        }
        if req.temperature > 0:
            kwargs |= {"temperature": req.temperature, "top_p": req.top_p}
        thread = threading.Thread(target=self._generate, kwargs=kwargs, daemon=True)
        thread.start()
        return streamer, thread, len(ids)

    def _generate(self, **kwargs: object) -> None:
        try:
            with torch.inference_mode():
                self.model.generate(**kwargs)
        except Exception:
            logger.exception("generate failed")
            kwargs["streamer"].end()  # type: ignore[attr-defined]  # unblock the reader


def get_state(request: Request) -> NaiveState:
    return request.app.state.naive


State = Annotated[NaiveState, Depends(get_state)]


def _chunk(cid: str, name: str, delta: dict[str, str], finish: str | None = None) -> str:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n"


async def _run(state: NaiveState, req: ChatRequest) -> AsyncIterator[str | dict[str, int]]:
    """Text pieces as they come, then the usage; holds the lock for the whole generation."""
    async with state.lock:
        stop = threading.Event()
        streamer, thread, num_prompt = state.start_generate(req, stop)
        try:
            pieces = iter(streamer)
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                if piece:
                    yield piece
        finally:
            stop.set()  # a no-op when generation ended by itself
            await asyncio.to_thread(thread.join)
        n = streamer.num_tokens
        yield {"prompt_tokens": num_prompt, "completion_tokens": n, "total_tokens": num_prompt + n}


async def _sse(state: NaiveState, req: ChatRequest) -> AsyncIterator[str]:
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    yield _chunk(cid, state.name, {"role": "assistant", "content": ""})
    usage: dict[str, int] = {}
    async for item in _run(state, req):
        if isinstance(item, dict):
            usage = item
        else:
            yield _chunk(cid, state.name, {"content": item})
    finish = "length" if usage.get("completion_tokens", 0) >= req.max_tokens else "stop"
    yield _chunk(cid, state.name, {}, finish)
    if req.stream_options and req.stream_options.include_usage:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "model": state.name,
            "choices": [],
            "usage": usage,
        }
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def create_app(state: NaiveState) -> FastAPI:
    """The baseline's routes: chat completions (streaming or not), models, health."""
    app = FastAPI(title="naive HF baseline")
    app.state.naive = state

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(state: State) -> dict[str, object]:
        return {"object": "list", "data": [{"id": state.name, "object": "model"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest, state: State) -> StreamingResponse | JSONResponse:
        if req.stream:
            return StreamingResponse(_sse(state, req), media_type="text/event-stream")
        text, usage = "", {}
        async for item in _run(state, req):
            usage, text = (item, text) if isinstance(item, dict) else (usage, text + item)
        message = {"role": "assistant", "content": text}
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "model": state.name,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            }
        )

    return app


def main(argv: list[str] | None = None) -> None:
    """Load the model and serve it with uvicorn."""
    import uvicorn

    from surge.engine.async_engine import model_name
    from surge.engine.model_runner import resolve_dtype

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    files = load_model_files(args.model)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    state = NaiveState(
        load_hf_model(files, dtype), Tokenizer.from_model_files(files), model_name(args.model)
    )
    logger.info("naive baseline: %s in %s on %s:%d", state.name, dtype, args.host, args.port)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
