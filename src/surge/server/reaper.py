"""The reaper: ends requests whose client stopped reading, and deadlines a stalled reader hides.

A stream's deadlines are checked where its outputs are read, so a client that stops reading
would also stop its own deadline. Every REAP_INTERVAL_S this task looks at every admitted
request from the outside: past a deadline, or with output unread for `--stream-read-timeout`
(or more than `--max-unread-chars` waiting), the request is aborted in the engine (its KV
blocks are freed at once) and its admission slot is given back. The stream, if its client
ever reads again, ends with the abort or a timeout error event.
"""

from __future__ import annotations

import asyncio
import logging
import time

from surge.engine.async_engine import AsyncEngine
from surge.server.admission import Ticket
from surge.server.state import ServerState

logger = logging.getLogger(__name__)

REAP_INTERVAL_S = 0.5
CLIENT_STALLED = "client_stalled"


async def reap_forever(state: ServerState) -> None:
    """Run reap_once every REAP_INTERVAL_S until cancelled."""
    while True:
        await asyncio.sleep(REAP_INTERVAL_S)
        try:
            await reap_once(state, time.monotonic())
        except Exception:  # noqa: BLE001 - the reaper must outlive any one bad request
            logger.exception("reaper pass failed")


async def reap_once(state: ServerState, now: float) -> list[str]:
    """Abort what must end now; return the aborted request ids."""
    reaped = []
    for ticket in list(state.admission.tickets.values()):
        engine = ticket.engine
        if engine is None:
            continue
        reason = _reason(ticket, engine, state, now)
        if reason is None:
            continue
        logger.warning("aborting request %s: %s", ticket.req_id, reason)
        ticket.aborted_for = reason
        ticket.outcome = "abort" if reason == CLIENT_STALLED else "timeout"
        state.metrics.request_aborted.labels(reason=reason).inc()
        await engine.abort(ticket.req_id)
        state.admission.release(ticket)
        reaped.append(ticket.req_id)
    return reaped


def _reason(ticket: Ticket, engine: AsyncEngine, state: ServerState, now: float) -> str | None:
    """Why this request must end now ("queue_timeout", "request_timeout", CLIENT_STALLED)."""
    if ticket.aborted_for is not None:
        return None
    deadline, code = ticket.next_deadline()
    if deadline is not None and now >= deadline:
        return code
    unread_since, unread_chars = engine.unread(ticket.req_id)
    if unread_since is None:
        return None
    config = state.config
    if now - unread_since > config.stream_read_timeout or unread_chars > config.max_unread_chars:
        return CLIENT_STALLED
    return None
