"""OpenAI wire types (pydantic, only at the HTTP edge) and the OpenAI error body."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from surge.engine.request import InvalidRequestError, SamplingParams

# Documented caps on what one request may ask for (README "Limits"). Each keeps the cost of a
# request's bookkeeping bounded: stop strings are matched against every new token's text.
MAX_N = 128  # OpenAI's own cap on `n`
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SEED_MAX = 2**64 - 1  # torch generators take seeds up to 2^64 - 1


def _utf8(value: str) -> str:
    """Refuse text that can't be UTF-8 (a lone surrogate such as "\ud800" from JSON)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text must be valid Unicode: lone surrogate at character {e.start}"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
StopString = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
# Ollama's keep_alive: "5m", "1h30m", seconds, 0 (unload when idle), negative (forever)
KeepAliveValue = Annotated[Text, Field(max_length=64)] | float
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's cap on inputs per embeddings request
MAX_RERANK_DOCUMENTS = 1024


class OpenAIBaseModel(BaseModel):
    """Unknown fields are ignored, as OpenAI's API does; NaN and infinities are refused."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo


class APIError(Exception):
    """An error the API answers with an HTTP status and OpenAI's error body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers

    def body(self) -> dict[str, dict[str, str | None]]:
        return ErrorResponse(error=self.info).model_dump()


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class TextPart(OpenAIBaseModel):
    type: Literal["text"] = "text"
    text: Text


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _SamplingFields(OpenAIBaseModel):
    """Fields common to both generation endpoints; names as OpenAI's and vLLM's extras."""

    model: Text | None = None
    max_tokens: Int64 | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: StopString | StopList | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=SEED_MAX)] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # vLLM extras
    top_k: Int64 = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    priority: Int64 | None = None  # None = the API key's priority; never better than it
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    keep_alive: KeepAliveValue | None = None  # Ollama's: how long the model stays loaded after
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams.validate() raises InvalidRequestError naming the bad field."""
        if self.seed is not None and self.seed + self.n - 1 > SEED_MAX:
            # choice i is seeded with seed + i: refuse now, not after the first choice was sent
            raise InvalidRequestError(
                f"seed + n - 1 must be at most {SEED_MAX} (choice i uses seed + i)", param="seed"
            )
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int64 | None = None
    logprobs: bool = False
    top_logprobs: Int64 | None = None

    def to_sampling_params(self) -> SamplingParams:
        """The engine's SamplingParams; max_tokens None = up to the model's context."""
        max_tokens = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise InvalidRequestError("top_logprobs must be in [0, 20]", param="top_logprobs")
        return self._sampling_params(max_tokens, logprobs)

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them (`developer` is OpenAI's new `system`)."""
        return template_messages(self.messages)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template takes them (`developer` is OpenAI's new `system`)."""
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in messages
    ]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions: one prompt (text or token ids) per request."""

    prompt: Text | list[TokenId] | list[Text] | list[list[TokenId]]
    max_tokens: Int64 | None = 16  # OpenAI's default for completions
    logprobs: Int64 | None = None
    echo: bool = False

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)

    def single_prompt(self) -> str | list[int]:
        """The one prompt; a list holding one prompt is unwrapped, several are refused."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise InvalidRequestError("send one prompt per request", param="prompt")
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]


class TokenizeRequest(OpenAIBaseModel):
    """POST /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True


class DetokenizeRequest(OpenAIBaseModel):
    model: Text | None = None
    tokens: list[TokenId]


class EmbeddingRequest(OpenAIBaseModel):
    """POST /v1/embeddings (OpenAI's shape); `truncate` and `keep_alive` are extras."""

    model: Text | None = None
    input: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[list[TokenId]], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    user: Text | None = None
    truncate: bool | None = None  # None = the server's --no-embedding-truncate setting
    keep_alive: KeepAliveValue | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as one list: of texts, or of token-id lists."""
        x = self.input
        if isinstance(x, str):
            return [x]
        if x and isinstance(x[0], int):
            return [list(x)]  # type: ignore[arg-type]
        return list(x)  # type: ignore[arg-type]


class RerankDocument(OpenAIBaseModel):
    text: Text


class RerankRequest(OpenAIBaseModel):
    """POST /v1/rerank (the shape of vLLM, Jina and Cohere)."""

    model: Text | None = None
    query: Text
    documents: Annotated[
        list[Text] | list[RerankDocument], Field(min_length=1, max_length=MAX_RERANK_DOCUMENTS)
    ]
    top_n: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    return_documents: bool = True
    truncate: bool | None = None
    keep_alive: KeepAliveValue | None = None

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class PromptTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


def usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None
) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=None
        if cached_tokens is None
        else PromptTokensDetails(cached_tokens=min(cached_tokens, prompt_tokens)),
    )


class ModelCard(OpenAIBaseModel):
    """One registered model, with its state and Xinference's model_type/model_ability."""

    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "surge"
    max_model_len: int | None = None
    kind: str = "chat"
    state: str = "loaded"
    reason: str | None = None
    pinned: bool = False
    keep_alive: float | None = None  # seconds; None = forever
    model_type: str = "LLM"
    model_ability: list[str] = Field(default_factory=lambda: ["chat", "generate"])


class ModelList(OpenAIBaseModel):
    object: str = "list"
    data: list[ModelCard]
