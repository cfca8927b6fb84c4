"""Who gets in: queue limit, per-key token buckets and concurrency caps, and per-request deadlines.

- Queue: the engine runs up to `--max-num-seqs` sequences; past that, up to `--max-queue`
  more may wait. A request that would go beyond answers 429 at once, with `Retry-After`.
- Per key: requests/minute and tokens/minute are token buckets that refill continuously
  (capacity = one minute's worth). A request needs one request token; tokens/minute counts
  prompt + generated tokens, charged as they are known (prompt at admission, output at the
  end), and a request is admitted while the key's token bucket is above zero. Max concurrent
  caps a key's requests in flight. Any of these -> 429 with `Retry-After` (seconds).
- Deadlines: `--queue-timeout` bounds arrival -> first token, `--request-timeout` bounds
  arrival -> last token. Past either, the request is aborted in the engine and ends with a
  `timeout_error`: HTTP 504 when no response has started, else an SSE error event + [DONE].
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from surge.config import ServerConfig
from surge.engine.outputs import RequestOutput
from surge.server.auth import KeyInfo
from surge.server.metrics import Metrics
from surge.server.protocol import APIError

if TYPE_CHECKING:
    from surge.engine.async_engine import AsyncEngine
    from surge.router import Lease

logger = logging.getLogger("surge.server.requests")


class RequestTimeout(APIError):
    """A deadline passed; `code` says which one."""

    def __init__(self, code: str, seconds: float) -> None:
        what = "waiting for its first token" if code == "queue_timeout" else "in total"
        super().__init__(
            504, f"request timed out after {seconds:g} s {what}", type="timeout_error", code=code
        )


@dataclass(slots=True)
class TokenBucket:
    """`capacity` tokens, refilled at `rate` per second; the level may go below zero (debt)."""

    capacity: float
    rate: float
    level: float
    updated: float

    @classmethod
    def per_minute(cls, amount: int, now: float) -> TokenBucket:
        return cls(float(amount), amount / 60.0, float(amount), now)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, need: float) -> float:
        """Seconds until the level reaches `need` (0 if it has)."""
        return max(0.0, (need - self.level) / self.rate) if self.rate > 0 else math.inf


@dataclass(slots=True)
class _KeyState:
    rpm: TokenBucket | None
    tpm: TokenBucket | None
    in_flight: int = 0

    def charge_tokens(self, num_tokens: int) -> None:
        """Take tokens from the tokens/min bucket (it may go into debt)."""
        if self.tpm is not None:
            self.tpm.level -= num_tokens


@dataclass(slots=True)
class Ticket:
    """One admitted request: its key, model, deadlines and timings, until released."""

    req_id: str
    key: KeyInfo
    num_seqs: int
    num_prompt_tokens: int
    priority: int
    arrival: float
    deadline: float | None = None
    queue_deadline: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_output_tokens: int = 0
    outcome: str = "abort"  # a finish_reason, "timeout", or "abort" (client gone)
    released: bool = False
    queue_time: float | None = None  # arrival -> first scheduled, when the engine reports it
    itl: list[float] = field(default_factory=list)
    aborted_for: str | None = None  # set by the reaper: a timeout code, or "client_stalled"
    model: str = ""
    engine: AsyncEngine | None = None  # the engine running it (the reaper and drain abort there)
    lease: Lease | None = None  # the hold on its model, given back with the ticket
    session: str | None = None  # the client's session (replica affinity), if it named one

    def timeout(self) -> RequestTimeout:
        """The error of a deadline that passed (aborted_for names which)."""
        code = self.aborted_for or "request_timeout"
        start = self.queue_deadline if code == "queue_timeout" else self.deadline
        return RequestTimeout(code, (start or self.arrival) - self.arrival)

    def next_deadline(self) -> tuple[float | None, str]:
        """The earliest deadline still ahead, and its timeout code."""
        if self.first_token_time is None and self.queue_deadline is not None:
            if self.deadline is None or self.queue_deadline < self.deadline:
                return self.queue_deadline, "queue_timeout"
        return self.deadline, "request_timeout"

    def on_output(self, out: RequestOutput) -> None:
        """Record the timing of one engine output."""
        now = time.monotonic()
        num = sum(len(c.token_ids) for c in out.outputs)
        new = num - self.num_output_tokens
        if new > 0:
            if self.first_token_time is None:
                self.first_token_time = now
            elif self.last_token_time is not None:
                self.itl.append((now - self.last_token_time) / new)
            self.last_token_time = now
        self.num_output_tokens = num
        m = out.metrics
        if self.queue_time is None and m is not None and m.first_scheduled_time is not None:
            self.queue_time = m.first_scheduled_time - m.arrival_time


class Admission:
    """Admits or refuses requests, and keeps what is in flight."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.draining = False
        self.tickets: dict[str, Ticket] = {}
        self.num_seqs_in_flight: dict[str, int] = {}  # by model: each has its own queue
        self._keys: dict[str, _KeyState] = {}

    def reject(
        self, status: int, reason: str, message: str, retry_after: float | None = None
    ) -> APIError:
        """Count a refusal and build its error (429 carries Retry-After)."""
        self.metrics.request_rejected.labels(reason=reason).inc()
        headers = (
            None if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
        )
        kind = "rate_limit_error" if status == 429 else "service_unavailable"
        return APIError(status, message, type=kind, code=reason, headers=headers)

    def check_key(self, key: KeyInfo) -> None:
        """Per-key requests/min, tokens/min and concurrency, before any work is done."""
        state, now = self._key_state(key), time.monotonic()
        if key.max_concurrent is not None and state.in_flight >= key.max_concurrent:
            raise self.reject(
                429,
                "key_concurrency",
                f"too many concurrent requests for this key (max {key.max_concurrent})",
                1,
            )
        for bucket, reason, need, what in (
            (state.rpm, "key_rpm", 1.0, "requests"),
            (state.tpm, "key_tpm", 1e-9, "tokens"),
        ):
            if bucket is not None:
                bucket.refill(now)
                if bucket.level < need:
                    limit = round(bucket.capacity)
                    raise self.reject(
                        429,
                        reason,
                        f"rate limit of {limit} {what}/min reached for this key",
                        bucket.wait_for(need),
                    )

    def admit(
        self,
        req_id: str,
        key: KeyInfo,
        num_prompt_tokens: int,
        n: int,
        priority: int | None,
        arrival: float,
        *,
        model: str,
        max_num_seqs: int,
    ) -> Ticket:
        """Take the request in on `model` (which runs `max_num_seqs` at once), or raise the
        APIError (429/503) that refuses it."""
        if self.draining:
            raise self.reject(503, "draining", "the server is shutting down")
        self.check_key(key)
        in_flight = self.num_seqs_in_flight.get(model, 0)
        waiting = in_flight + n - max_num_seqs
        if waiting > self.config.max_queue:
            raise self.reject(
                429,
                "queue_full",
                f"the server is at capacity (queue of {self.config.max_queue} full); retry later",
                self.config.retry_after,
            )
        self._take_key_slot(key).charge_tokens(num_prompt_tokens)
        c = self.config
        ticket = Ticket(
            req_id,
            key,
            n,
            num_prompt_tokens,
            key.priority if priority is None else priority,
            arrival,
            deadline=None if c.request_timeout is None else arrival + c.request_timeout,
            queue_deadline=None if c.queue_timeout is None else arrival + c.queue_timeout,
            model=model,
        )
        self.tickets[req_id] = ticket
        self.num_seqs_in_flight[model] = in_flight + n
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The request is over: free its slots, charge its output, record metrics and log it."""
        if ticket.released:
            return
        ticket.released = True
        self.tickets.pop(ticket.req_id, None)
        self.num_seqs_in_flight[ticket.model] -= ticket.num_seqs
        if ticket.lease is not None:
            ticket.lease.release()
        state = self._key_state(ticket.key)
        state.in_flight -= 1
        state.charge_tokens(ticket.num_output_tokens)
        self._observe(ticket, time.monotonic())

    @contextlib.contextmanager
    def hold(self, key: KeyInfo) -> Iterator[Callable[[int], None]]:
        """A key's slot for a request outside the engine (embeddings, rerank): its request and
        concurrency are counted like a generation's; call the yielded function with its tokens."""
        if self.draining:
            raise self.reject(503, "draining", "the server is shutting down")
        self.check_key(key)
        state = self._take_key_slot(key)
        try:
            yield state.charge_tokens
        finally:
            state.in_flight -= 1

    def _take_key_slot(self, key: KeyInfo) -> _KeyState:
        """Count one more request of this key in flight and charge its request/min bucket."""
        state = self._key_state(key)
        state.in_flight += 1
        if state.rpm is not None:
            state.rpm.level -= 1
        return state

    def _observe(self, t: Ticket, now: float) -> None:
        m, model = self.metrics, t.model
        m.prompt_tokens.labels(model=model).inc(t.num_prompt_tokens)
        m.generation_tokens.labels(model=model).inc(t.num_output_tokens)
        m.request_success.labels(model=model, finished_reason=t.outcome).inc()
        e2e = now - t.arrival
        m.e2e.labels(model=model).observe(e2e)
        ttft = None if t.first_token_time is None else t.first_token_time - t.arrival
        if ttft is not None:
            m.ttft.labels(model=model).observe(ttft)
        queue_time = t.queue_time if t.queue_time is not None else ttft
        if queue_time is not None:
            m.queue_time.labels(model=model).observe(queue_time)
        itl = m.itl.labels(model=model)
        for x in t.itl:
            itl.observe(x)
        logger.info(
            "request id=%s model=%s key=%s outcome=%s prompt_tokens=%d output_tokens=%d ttft=%s e2e=%.3f",
            t.req_id,
            t.model,
            t.key.name,
            t.outcome,
            t.num_prompt_tokens,
            t.num_output_tokens,
            "-" if ttft is None else f"{ttft:.3f}",
            e2e,
        )

    def _key_state(self, key: KeyInfo) -> _KeyState:
        state = self._keys.get(key.name)
        if state is None:
            now = time.monotonic()
            state = _KeyState(
                rpm=None if key.rpm is None else TokenBucket.per_minute(key.rpm, now),
                tpm=None if key.tpm is None else TokenBucket.per_minute(key.tpm, now),
            )
            self._keys[key.name] = state
        return state
