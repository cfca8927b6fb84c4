"""A request's state and lifecycle, and the sampling parameters it carries."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """User input the engine cannot take; the API turns it into a 400 naming `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestStatus(enum.IntEnum):
    """Lifecycle, ordered: every status after PREEMPTED is terminal."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI `finish_reason` of a terminal status, None while the request lives."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass
class SamplingParams:
    """How to sample one request; mirrors vLLM's names. `validate()` raises InvalidRequestError."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the model's context length
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives; 0 = only the sampled token's
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> None:
        """Check every field; raise InvalidRequestError naming the first bad one."""
        checks: list[tuple[bool, str, str]] = [
            (isinstance(self.n, int) and self.n >= 1, "n", "n must be an integer >= 1"),
            (self.temperature >= 0.0, "temperature", "temperature must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]"),
            (
                isinstance(self.top_k, int) and self.top_k >= -1,
                "top_k",
                "top_k must be -1, 0 or a positive integer",
            ),
            (0.0 <= self.min_p <= 1.0, "min_p", "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "repetition_penalty must be > 0"),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                "presence_penalty",
                "presence_penalty must be in [-2, 2]",
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                "frequency_penalty",
                "frequency_penalty must be in [-2, 2]",
            ),
            (
                self.max_tokens is None
                or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
                "max_tokens",
                "max_tokens must be an integer >= 1",
            ),
            (
                self.logprobs is None
                or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
                "logprobs",
                "logprobs must be an integer in [0, 20]",
            ),
            (
                all(isinstance(s, str) and s for s in self.stop),
                "stop",
                "stop must be non-empty strings",
            ),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids",
                "stop_token_ids must be non-negative integers",
            ),
            (self.seed is None or isinstance(self.seed, int), "seed", "seed must be an integer"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param=param)


@dataclass(slots=True)
class Request:
    """One sequence in the engine. Only the scheduler changes its status (through `_finish`/`_preempt`)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0
    priority: int = 0  # lower runs earlier, as in vLLM
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit of the first schedule; -1 = not scheduled yet
    num_preemptions: int = 0
    error: str | None = None
    # logprobs of each output token when asked: (sampled logprob, [(token_id, logprob), ...top-k])
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Token ids in [start, end) over prompt then output, without building the full list."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason
