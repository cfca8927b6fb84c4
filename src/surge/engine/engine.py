"""LLMEngine: tokenizer + output processor over an in-process EngineCore; step() -> RequestOutputs."""

from __future__ import annotations

import logging

from surge.config import EngineConfig, EngineLimits
from surge.engine.core import EngineCore
from surge.engine.inputs import check_request_fits, encode_prompt
from surge.engine.messages import EngineCoreFinish
from surge.engine.output_processor import OutputProcessor
from surge.engine.outputs import RequestOutput
from surge.engine.request import SamplingParams
from surge.models.loader import load_model_files
from surge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    """The synchronous engine: add requests, call step() until done."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.files = load_model_files(config.model)
        self.tokenizer = Tokenizer.from_model_files(self.files)
        self.core = EngineCore(config, self.files, self.tokenizer.eos_token_ids)
        self.processor = OutputProcessor(self.tokenizer)

    @property
    def limits(self) -> EngineLimits:
        return self.core.limits

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """Text or token ids -> (text, token ids)."""
        return encode_prompt(self.tokenizer, prompt)

    def add_request(
        self,
        req_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
    ) -> None:
        """Validate and queue a request; bad input raises InvalidRequestError."""
        text, token_ids = self.encode_prompt(prompt)
        check_request_fits(token_ids, params.max_tokens, self.limits)
        for core_req in self.processor.add_request(req_id, text, token_ids, params, priority):
            self.core.add_request(core_req)

    def abort_request(self, req_id: str) -> None:
        """Stop a request now; its KV blocks are freed."""
        live = self.processor.abort_request(req_id)
        if live:
            self.core.finish_requests(EngineCoreFinish(live, "abort"))

    def has_unfinished_requests(self) -> bool:
        return len(self.processor) > 0 or self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the requests it changed."""
        outputs, stopped = self.processor.process(self.core.step())
        if stopped:
            self.core.finish_requests(EngineCoreFinish(stopped, "stop"))
        return outputs
