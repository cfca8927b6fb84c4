"""Per-request output hand-off: a reader that falls behind gets one merged output, not a backlog."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from surge.engine.outputs import CompletionOutput, RequestOutput


@dataclass(slots=True)
class OutputCollector:
    """The latest unread output of one request.

    Outputs are cumulative (text, token ids, logprobs so far) plus a delta; a new output while
    the previous one is unread replaces it and keeps both deltas. So what waits for a slow or
    stalled reader is one output, bounded by the request's length, never one per step.
    """

    output: RequestOutput | None = None
    unread_since: float | None = None  # monotonic time the oldest unread output arrived
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, out: RequestOutput) -> None:
        if self.output is None:
            self.unread_since = time.monotonic()
        else:
            _merge_deltas(self.output, out)
        self.output = out
        self._ready.set()

    async def get(self) -> RequestOutput:
        """The next output (merged with any that arrived meanwhile); waits for one."""
        while self.output is None:
            self._ready.clear()
            await self._ready.wait()
        out, self.output, self.unread_since = self.output, None, None
        return out

    @property
    def unread_chars(self) -> int:
        """Text waiting for the reader."""
        if self.output is None:
            return 0
        return sum(len(c.delta_text) for c in self.output.outputs)


def _merge_deltas(old: RequestOutput, new: RequestOutput) -> None:
    """Prepend the unread output's deltas to the new one's (the cumulative fields are newer)."""
    old_by_index: dict[int, CompletionOutput] = {c.index: c for c in old.outputs}
    for c in new.outputs:
        prev = old_by_index.get(c.index)
        if prev is not None and (prev.delta_text or prev.delta_token_ids):
            c.delta_text = prev.delta_text + c.delta_text
            c.delta_token_ids = prev.delta_token_ids + c.delta_token_ids
