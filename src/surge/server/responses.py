"""Engine outputs -> OpenAI response bodies and stream chunks (chat and text completions)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from surge.engine.outputs import CompletionOutput, RequestOutput
from surge.server.protocol import usage
from surge.tokenizer import Tokenizer

JSON = dict[str, object]


@dataclass(slots=True)
class Renderer:
    """Builds one request's chunks/response; remembers what each choice has already sent."""

    kind: str  # "chat" or "completion"
    req_id: str
    model: str
    tokenizer: Tokenizer
    num_top_logprobs: int | None  # None = no logprobs asked
    include_usage: bool = False
    echo_prompt: str = ""  # completions with echo=true: the prompt text, sent first
    created: int = field(default_factory=lambda: int(time.time()))
    _num_logprobs_sent: dict[int, int] = field(default_factory=dict)
    _finished: set[int] = field(default_factory=set)

    @property
    def object_name(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def first_chunks(self, n: int) -> list[JSON]:
        """What a stream opens with: the assistant role (chat), or the echoed prompt."""
        if self.kind == "chat":
            choices = [
                self._delta_choice(i, {"role": "assistant", "content": ""}) for i in range(n)
            ]
        elif self.echo_prompt:
            choices = [self._delta_choice(i, self.echo_prompt) for i in range(n)]
        else:
            return []
        return [self.chunk(choices)]

    def delta_chunks(self, out: RequestOutput) -> list[JSON]:
        """The new text of each choice in one engine output; a choice's last one has finish_reason."""
        choices = []
        for c in out.outputs:
            if c.index in self._finished:
                continue
            logprobs = self._new_logprobs(c)
            finish = c.finish_reason if c.finished else None
            if not (c.delta_text or logprobs or finish):
                continue
            if finish:
                self._finished.add(c.index)
            content: str | dict[str, str] = (
                {"content": c.delta_text} if self.kind == "chat" else c.delta_text
            )
            choices.append(self._delta_choice(c.index, content, logprobs, finish))
        return [self.chunk([ch]) for ch in choices]

    def usage_chunk(self, out: RequestOutput) -> JSON:
        """The last chunk when stream_options.include_usage: no choices, the usage."""
        return {**self.chunk([]), "usage": _usage(out)}

    def chunk(self, choices: list[JSON]) -> JSON:
        body: JSON = {
            "id": self.req_id,
            "object": f"{self.object_name}.chunk" if self.kind == "chat" else self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None
        return body

    def response(self, out: RequestOutput) -> JSON:
        """The whole non-streaming response."""
        choices = []
        for c in out.outputs:
            self._num_logprobs_sent.pop(c.index, None)
            logprobs = self._new_logprobs(c)
            if self.kind == "chat":
                choice: JSON = {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                }
            else:
                choice = {"index": c.index, "text": self.echo_prompt + c.text}
            choice.update(
                logprobs=logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason
            )
            choices.append(choice)
        return {
            "id": self.req_id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": _usage(out),
        }

    def _delta_choice(
        self,
        index: int,
        content: str | dict[str, str],
        logprobs: JSON | None = None,
        finish: str | None = None,
    ) -> JSON:
        key = "delta" if self.kind == "chat" else "text"
        return {"index": index, key: content, "logprobs": logprobs, "finish_reason": finish}

    def _new_logprobs(self, c: CompletionOutput) -> JSON | None:
        """Logprobs of the tokens this choice has not sent yet, in the endpoint's format."""
        if self.num_top_logprobs is None or c.logprobs is None:
            return None
        start = self._num_logprobs_sent.get(c.index, 0)
        entries = list(zip(c.token_ids[start:], c.logprobs[start:], strict=False))
        self._num_logprobs_sent[c.index] = start + len(entries)
        if not entries:
            return None
        k = self.num_top_logprobs
        if self.kind == "chat":
            return {"content": [self._chat_logprob(tid, lps, k) for tid, lps in entries]}
        tokens = [self._token(tid) for tid, _ in entries]
        return {
            "tokens": tokens,
            "token_logprobs": [lps.get(tid) for tid, lps in entries],
            "top_logprobs": [{self._token(t): lp for t, lp in _top(lps, k)} for _, lps in entries],
            "text_offset": [],
        }

    def _chat_logprob(self, token_id: int, lps: dict[int, float], k: int) -> JSON:
        token = self._token(token_id)
        return {
            "token": token,
            "logprob": lps.get(token_id),
            "bytes": list(token.encode()),
            "top_logprobs": [
                {"token": (t := self._token(tid)), "logprob": lp, "bytes": list(t.encode())}
                for tid, lp in _top(lps, k)
            ],
        }

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _top(lps: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(lps.items(), key=lambda kv: kv[1], reverse=True)[:k]


def _usage(out: RequestOutput) -> JSON:
    completion = sum(len(c.token_ids) for c in out.outputs)
    return usage(len(out.prompt_token_ids), completion, out.num_cached_tokens).model_dump()
