"""Front-end side of a request: fan-out of n, incremental detokenizing, stop strings, aggregation."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from surge.engine.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
from surge.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from surge.engine.request import SamplingParams
from surge.tokenizer import IncrementalDetokenizer, Tokenizer


def child_req_id(req_id: str, index: int, n: int) -> str:
    """The core-side id of completion `index` of a request."""
    return req_id if n == 1 else f"{req_id}#{index}"


@dataclass(slots=True)
class _SeqState:
    """One completion being detokenized."""

    parent: _RequestState
    completion: CompletionOutput
    detokenizer: IncrementalDetokenizer
    want_logprobs: bool


@dataclass(slots=True)
class _RequestState:
    """A user's request and its n completions."""

    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[_SeqState] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))
    num_cached_tokens: int = 0


class OutputProcessor:
    """Turns the core's token outputs into RequestOutputs; finds stop strings the core can't see."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}
        self._seqs: dict[str, _SeqState] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def add_request(
        self,
        req_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
    ) -> list[EngineCoreRequest]:
        """Register a request; return the core requests (one per completion) to send."""
        if req_id in self._requests:
            raise ValueError(f"request id {req_id!r} is already in use")
        state = _RequestState(req_id, prompt, prompt_token_ids)
        self._requests[req_id] = state
        core_requests = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + i
                child_params = _replace(params, n=1, seed=seed)
            child_id = child_req_id(req_id, i, params.n)
            detok = IncrementalDetokenizer(
                self.tokenizer,
                prompt_token_ids,
                params.stop,
                params.skip_special_tokens,
                params.include_stop_str_in_output,
            )
            seq = _SeqState(state, CompletionOutput(index=i), detok, params.logprobs is not None)
            if seq.want_logprobs:
                seq.completion.logprobs, seq.completion.cumulative_logprob = [], 0.0
            state.seqs.append(seq)
            self._seqs[child_id] = seq
            core_requests.append(
                EngineCoreRequest(
                    child_id, prompt_token_ids, child_params, state.metrics.arrival_time, priority
                )
            )
        return core_requests

    def abort_request(self, req_id: str) -> list[str]:
        """Forget a request; return its core ids still running (to abort in the core)."""
        state = self._requests.pop(req_id, None)
        if state is None:
            return []
        n = len(state.seqs)
        ids = [child_req_id(req_id, i, n) for i in range(n)]
        live = [
            cid for cid, seq in zip(ids, state.seqs, strict=True) if not seq.completion.finished
        ]
        for cid in ids:
            self._seqs.pop(cid, None)
        return live

    def emitted_token_ids(self, core_id: str) -> list[int] | None:
        """The tokens a running sequence has produced so far; None once it finished (or unknown)."""
        seq = self._seqs.get(core_id)
        if seq is None or seq.completion.finished:
            return None
        return list(seq.completion.token_ids)

    def process(self, outputs: EngineCoreOutputs) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step; return the RequestOutputs that changed and core ids hit by a stop string."""
        touched: dict[str, _RequestState] = {}
        stopped: list[str] = []
        now = time.monotonic()
        for req_id in outputs.first_scheduled_req_ids:
            seq = self._seqs.get(req_id)
            if seq is not None and seq.parent.metrics.first_scheduled_time is None:
                seq.parent.metrics.first_scheduled_time = now
        for out in outputs.outputs:
            seq = self._seqs.get(out.req_id)
            if seq is None:
                continue  # aborted meanwhile
            if self._apply(seq, out):
                stopped.append(out.req_id)
            state = seq.parent
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            if out.new_token_ids and state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            if seq.completion.finished:
                del self._seqs[out.req_id]
            touched[state.req_id] = state
        results = [self._request_output(state, now) for state in touched.values()]
        for state in touched.values():
            for s in state.seqs:
                s.completion.delta_text, s.completion.delta_token_ids = "", []
        return results, stopped

    def _apply(self, seq: _SeqState, out: EngineCoreOutput) -> bool:
        """Add one output to a completion; True if a stop string ended it here."""
        c = seq.completion
        if out.new_token_ids:
            c.token_ids.extend(out.new_token_ids)
            c.delta_token_ids.extend(out.new_token_ids)
            c.delta_text += seq.detokenizer.add_tokens(out.new_token_ids)
            if seq.want_logprobs and out.new_logprobs:
                for token_id, (lp, top) in zip(out.new_token_ids, out.new_logprobs, strict=True):
                    entry = dict(top)
                    entry[token_id] = lp
                    c.logprobs.append(entry)  # type: ignore[union-attr]
                    c.cumulative_logprob = (c.cumulative_logprob or 0.0) + lp
        hit_stop = seq.detokenizer.stop_matched is not None
        if hit_stop:
            c.finish_reason, c.stop_reason = "stop", seq.detokenizer.stop_matched
        elif out.finish_reason is not None:
            c.delta_text += seq.detokenizer.flush()
            c.finish_reason, c.stop_reason, c.error = out.finish_reason, out.stop_reason, out.error
        c.text = seq.detokenizer.text
        # the core has already finished it on its own unless only the stop string ended it
        return hit_stop and out.finish_reason is None

    def _request_output(self, state: _RequestState, now: float) -> RequestOutput:
        finished = all(s.completion.finished for s in state.seqs)
        if finished:
            state.metrics.finished_time = now
            self._requests.pop(state.req_id, None)
        return RequestOutput(
            req_id=state.req_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[_snapshot(s.completion) for s in state.seqs],
            finished=finished,
            num_cached_tokens=state.num_cached_tokens,
            metrics=state.metrics,
        )


def _snapshot(c: CompletionOutput) -> CompletionOutput:
    """A copy the caller may keep while the engine goes on appending."""
    return CompletionOutput(
        index=c.index,
        text=c.text,
        token_ids=list(c.token_ids),
        finish_reason=c.finish_reason,
        stop_reason=c.stop_reason,
        logprobs=None if c.logprobs is None else list(c.logprobs),
        cumulative_logprob=c.cumulative_logprob,
        delta_text=c.delta_text,
        delta_token_ids=c.delta_token_ids,
        error=c.error,
    )


def _replace(params: SamplingParams, **changes: object) -> SamplingParams:
    """A copy of params with some fields changed (and validated again)."""
    return dataclasses.replace(params, **changes)  # type: ignore[arg-type]
