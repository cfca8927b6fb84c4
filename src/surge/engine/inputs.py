"""Input checks shared by every front end: prompt encoding and what can ever fit."""

from __future__ import annotations

from surge.config import EngineLimits
from surge.engine.request import InvalidRequestError
from surge.tokenizer import Tokenizer


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[int]) -> tuple[str | None, list[int]]:
    """Text or token ids -> (text, token ids)."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
        raise InvalidRequestError("a prompt is a string or a list of token ids", param="prompt")
    return None, list(prompt)


def check_request_fits(
    prompt_token_ids: list[int], max_tokens: int | None, limits: EngineLimits
) -> None:
    """Reject what the engine could never finish: raise InvalidRequestError stating the limits."""
    num_prompt_tokens = len(prompt_token_ids)
    vocab = limits.vocab_size
    if vocab and any(not 0 <= t < vocab for t in prompt_token_ids):
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
    if num_prompt_tokens == 0:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    if num_prompt_tokens >= limits.max_model_len:
        raise InvalidRequestError(
            f"the prompt has {num_prompt_tokens} tokens; this model's maximum context length is "
            f"{limits.max_model_len} tokens (prompt + at least one generated token)",
            param="messages",
        )
    total = num_prompt_tokens + (max_tokens or 1)
    if max_tokens is not None and total > limits.max_model_len:
        raise InvalidRequestError(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
            f"this model's maximum context length of {limits.max_model_len} tokens",
            param="max_tokens",
        )
    if total > limits.kv_capacity_tokens:
        raise InvalidRequestError(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens or 1}) = {total} can never "
            f"fit the KV cache of {limits.kv_capacity_tokens} tokens",
            param="max_tokens",
        )
