"""Continuous batching: one token budget per step, chunked prefill, priority, preemption.

The one rule (vLLM v1): there is no prefill phase. Each request's `num_computed_tokens` catches
up with its `num_tokens`; a step gives each scheduled request some of the missing tokens.
Prompt prefill, chunked prefill, decode, prefix hits and recompute after preemption all fall
out of that rule. No torch here: `schedule()` returns plain dataclasses.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from surge.config import EngineConfig, EngineLimits
from surge.engine.block_pool import KVCacheManager
from surge.engine.request import InvalidRequestError, Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledSeq:
    """One request's share of a step."""

    request: Request
    num_new_tokens: int
    # Before this step: new tokens sit at [num_computed_tokens, num_computed_tokens + num_new).
    num_computed_tokens: int
    block_ids: list[int]  # the request's block table (a copy)
    sample: bool  # the step reaches the end of the request's tokens, so a token is sampled


@dataclass(slots=True)
class SchedulerOutput:
    """What the model runner executes in one step."""

    seqs: list[ScheduledSeq]  # num_new_tokens == 1 first (decodes), then the rest
    num_batched_tokens: int
    preempted_req_ids: list[str]
    finished_req_ids: list[str]  # finished or aborted since the previous schedule()
    first_scheduled_req_ids: list[str] = field(default_factory=list)  # queue wait ends here


@dataclass(slots=True)
class _Step:
    """Budget and choices of the step being built."""

    token_budget: int
    seqs: dict[str, ScheduledSeq] = field(default_factory=dict)
    preempted_req_ids: list[str] = field(default_factory=list)
    running_preempted: bool = False  # a running request lost its blocks to another one
    first_scheduled_req_ids: list[str] = field(default_factory=list)

    def add(self, request: Request, num_new_tokens: int, block_ids: list[int]) -> None:
        num_computed = request.num_computed_tokens
        sample = num_computed + num_new_tokens == request.num_tokens
        seq = ScheduledSeq(request, num_new_tokens, num_computed, block_ids, sample)
        self.seqs[request.req_id] = seq
        self.token_budget = max(0, self.token_budget - num_new_tokens)

    def drop(self, req_id: str) -> None:
        """Unschedule a request preempted after it got its share; refund its tokens."""
        seq = self.seqs.pop(req_id, None)
        if seq is not None:
            self.token_budget += seq.num_new_tokens


class Scheduler:
    """Decides which tokens of which requests go into each step, within KV and token budgets."""

    def __init__(self, config: EngineConfig, limits: EngineLimits) -> None:
        self.config = config
        self.limits = limits
        self.kv = KVCacheManager(
            limits.num_kv_blocks, limits.block_size, config.enable_prefix_caching
        )
        # A request alone must always fit the KV cache, or preemption could not make progress.
        self.max_len = min(limits.max_model_len, limits.kv_capacity_tokens)
        self.requests: dict[str, Request] = {}  # every live (unfinished) request
        self.running: dict[str, Request] = {}  # insertion order = order they started running
        self.waiting: dict[str, Request] = {}  # WAITING or PREEMPTED
        # (priority, arrival, req_id); entries of requests no longer waiting are skipped lazily.
        self._waiting_heap: list[tuple[int, int, str]] = []
        self._arrival: dict[str, int] = {}
        self._next_arrival = 0
        self._finished_req_ids: list[str] = []
        self.num_preemptions_total = 0

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request; raises InvalidRequestError if it could never run."""
        if request.req_id in self.requests:
            raise ValueError(f"request {request.req_id!r} is already in the scheduler")
        if request.num_tokens == 0:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if request.num_tokens > self.max_len:
            raise InvalidRequestError(
                f"prompt has {request.num_tokens} tokens; the limit is {self.max_len} "
                f"(max_model_len {self.limits.max_model_len}, "
                f"KV cache {self.limits.kv_capacity_tokens} tokens)",
                param="prompt",
            )
        request.status = RequestStatus.WAITING
        self.requests[request.req_id] = request
        self.waiting[request.req_id] = request
        self._arrival[request.req_id] = self._next_arrival
        self._next_arrival += 1
        self._push_waiting(request)

    def abort_requests(self, req_ids: Iterable[str]) -> list[Request]:
        """Abort waiting or running requests; their blocks are freed at once."""
        return self.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(
        self, req_ids: Iterable[str], status: RequestStatus, error: str | None = None
    ) -> list[Request]:
        """Finish live requests from outside (stop string, error, abort); unknown ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"{status!r} is not a finished status")
        finished = []
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is not None:
                self._finish(request, status, error)
                finished.append(request)
        return finished

    def get_request(self, req_id: str) -> Request | None:
        return self.requests.get(req_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_waiting_tokens(self) -> int:
        """Tokens still to compute of the waiting (and preempted) sequences: queued prefill."""
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting.values())

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    @property
    def prefix_cache_queries(self) -> int:
        return self.kv.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.kv.prefix_cache_hits

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    # ---- one step --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens: running requests first, then waiting ones by priority."""
        step = _Step(self.config.max_num_batched_tokens)
        self._preempt_for_priority(step)
        self._schedule_running(step)
        # Blocks are short if a running request was preempted: admitting new work now would
        # only take the blocks it needs to resume.
        if not step.running_preempted:
            self._schedule_waiting(step)
        seqs = list(step.seqs.values())
        # The model runner relies on decodes coming first.
        ordered = [s for s in seqs if s.num_new_tokens == 1]
        ordered += [s for s in seqs if s.num_new_tokens != 1]
        finished, self._finished_req_ids = self._finished_req_ids, []
        return SchedulerOutput(
            seqs=ordered,
            num_batched_tokens=sum(s.num_new_tokens for s in seqs),
            preempted_req_ids=step.preempted_req_ids,
            finished_req_ids=finished,
            first_scheduled_req_ids=step.first_scheduled_req_ids,
        )

    def update_from_output(
        self, out: SchedulerOutput, sampled_token_ids: dict[str, int]
    ) -> list[Request]:
        """Advance computed tokens, append sampled ones, finish stopped requests."""
        touched = []
        for seq in out.seqs:
            request = seq.request
            if request.status != RequestStatus.RUNNING:
                continue  # aborted or finished between schedule() and now
            request.num_computed_tokens = seq.num_computed_tokens + seq.num_new_tokens
            token_id = sampled_token_ids.get(request.req_id) if seq.sample else None
            if token_id is None:
                continue
            request.output_token_ids.append(token_id)
            status = self._check_stop(request)
            if status is not None:
                self._finish(request, status)
            touched.append(request)
        return touched

    # ---- the phases of a step ----------------------------------------------------------------

    def _preempt_for_priority(self, step: _Step) -> None:
        """Make room for a waiting request that outranks the lowest-priority running one.

        Done before anything is scheduled, so no victim's blocks were handed out this step.
        """
        while self.running:
            head = self._peek_waiting()
            victim = max(self.running.values(), key=self._victim_key)
            if head is None or victim.priority <= head.priority:
                return
            if len(self.running) < self.config.max_num_seqs and self._fits(head, step):
                return
            self._preempt(victim, step)

    def _schedule_running(self, step: _Step) -> None:
        """Give each running request its next tokens: a decode or the next prefill chunk."""
        for request in list(self.running.values()):
            if step.token_budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(request.num_tokens - request.num_computed_tokens, step.token_budget)
            if num_new <= 0:
                continue  # its last step sampled nothing (runner error); the engine finishes it
            if not self._allocate_or_preempt(request, num_new, step):
                break  # it was its own victim: no blocks left for anyone after it
            step.add(request, num_new, self.kv.get_block_ids(request.req_id))

    def _allocate_or_preempt(self, request: Request, num_new: int, step: _Step) -> bool:
        """Allocate, preempting the lowest-priority newest running request until it fits."""
        while not self.kv.allocate_slots(request, num_new):
            victim = max(self.running.values(), key=self._victim_key)
            self._preempt(victim, step)
            step.running_preempted = True
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, step: _Step) -> None:
        """Admit waiting requests by (priority, arrival) while budget, seats and blocks last."""
        while step.token_budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self._peek_waiting()
            if request is None or request.req_id in step.preempted_req_ids:
                break  # a request preempted this step waits for the next one
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit
            if num_new > step.token_budget:
                if self.config.enable_chunked_prefill:
                    num_new = step.token_budget
                elif step.seqs:
                    break  # whole prompts only; a prompt over the budget runs in a step alone
            if not self.kv.allocate_slots(request, num_new, hit_blocks):
                break  # head-of-line: lower-priority requests must not overtake it
            heapq.heappop(self._waiting_heap)
            del self.waiting[request.req_id]
            self.running[request.req_id] = request
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
                step.first_scheduled_req_ids.append(request.req_id)
            step.add(request, num_new, self.kv.get_block_ids(request.req_id))

    # ---- status changes: every one goes through _preempt or _finish --------------------------

    def _preempt(self, request: Request, step: _Step) -> None:
        """Free a running request's blocks and requeue it at its original place to recompute."""
        self.kv.free(request)  # before resetting num_computed_tokens: computed blocks stay cached
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        del self.running[request.req_id]
        self.waiting[request.req_id] = request
        self._push_waiting(request)
        step.drop(request.req_id)
        step.preempted_req_ids.append(request.req_id)
        logger.debug("preempted %s (%d tokens)", request.req_id, request.num_tokens)

    def _finish(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        """Move a live request to a terminal status and release everything it holds."""
        request.status = status
        if error is not None:
            request.error = error
        self.kv.free(request)
        req_id = request.req_id
        self.running.pop(req_id, None)
        self.waiting.pop(req_id, None)
        self.requests.pop(req_id, None)
        self._arrival.pop(req_id, None)
        self._finished_req_ids.append(req_id)
        # Aborted waiting requests leave stale heap entries; rebuild before they pile up.
        if len(self._waiting_heap) > 2 * len(self.waiting) + 64:
            self._waiting_heap = [e for e in self._waiting_heap if e[2] in self.waiting]
            heapq.heapify(self._waiting_heap)

    # ---- helpers -------------------------------------------------------------------------

    def _check_stop(self, request: Request) -> RequestStatus | None:
        params = request.sampling_params
        last = request.output_token_ids[-1]
        if (not params.ignore_eos and last in self.limits.eos_token_ids) or (
            last in params.stop_token_ids
        ):
            return RequestStatus.FINISHED_STOPPED
        if request.num_tokens >= self.max_len or (
            params.max_tokens is not None and request.num_output_tokens >= params.max_tokens
        ):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _fits(self, request: Request, step: _Step) -> bool:
        """Whether a waiting request's first chunk would get its blocks now."""
        hit_blocks, num_hit = self.kv.get_computed_blocks(request)
        num_new = request.num_tokens - num_hit
        if self.config.enable_chunked_prefill:
            num_new = min(num_new, step.token_budget)
        return self.kv.num_blocks_needed(request, num_new, hit_blocks) <= self.kv.num_free_blocks

    def _victim_key(self, request: Request) -> tuple[int, int]:
        return request.priority, self._arrival[request.req_id]

    def _push_waiting(self, request: Request) -> None:
        entry = (request.priority, self._arrival[request.req_id], request.req_id)
        heapq.heappush(self._waiting_heap, entry)

    def _peek_waiting(self) -> Request | None:
        """The first live waiting request, dropping stale heap entries on the way."""
        heap = self._waiting_heap
        while heap:
            _, arrival, req_id = heap[0]
            request = self.waiting.get(req_id)
            if request is not None and self._arrival.get(req_id) == arrival:
                return request
            heapq.heappop(heap)
        return None
