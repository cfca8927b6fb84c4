"""The offline API, shaped like vLLM's: LLM(model).generate(...) and .chat(...)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from surge.config import EngineConfig
from surge.engine.engine import LLMEngine
from surge.engine.outputs import RequestOutput
from surge.engine.request import SamplingParams
from surge.tokenizer import Tokenizer

Message = dict[str, str]


class LLM:
    """Batch generation on one engine; `model=None` is the bundled default model."""

    def __init__(self, model: str | None = None, **engine_options: object) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))  # type: ignore[arg-type]
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        return self._run(list(prompts), sampling_params, priority)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate a reply to each conversation, formatted with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [tok.apply_chat_template(c, add_generation_prompt) for c in conversations]  # type: ignore[arg-type]
        return self._run(prompts, sampling_params, None)

    def _run(
        self,
        prompts: list[str] | list[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        priority: Sequence[int] | None,
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        order: dict[str, int] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            req_id = str(next(self._ids))
            order[req_id] = i
            self.engine.add_request(req_id, prompt, p, priority[i] if priority else 0)
        results: list[RequestOutput | None] = [None] * len(prompts)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[order[out.req_id]] = out
        return [r for r in results if r is not None]
