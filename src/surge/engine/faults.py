"""Fault injection for the reliability tests: make a core hang, crash or send garbage on cue.

Off unless `$SURGE_TEST_FAULTS` is set when the core starts (the tests set it on the server they
start). It holds JSON mapping a fault to a prompt prefix of token ids, e.g.
`{"hang": [7, 7, 7, 7]}`: the core step after a request whose prompt starts with that prefix
arrives never returns (a busy loop), `"crash"` exits the core process at once, `"garbage"` sends
bytes the front end can't decode. A normal prompt never starts with such a run of ids.

With `"once_dir": "/some/dir"` in the JSON, each fault fires once across all cores (the first
core to trigger it creates `<once_dir>/<fault>`): so a request that moves to another replica
after its core hung does not hang that one too, which lets tests watch a single failover.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

FAULTS_ENV = "SURGE_TEST_FAULTS"
FAULT_KINDS = ("hang", "crash", "garbage")


@dataclass(slots=True)
class FaultInjector:
    """The faults armed for this core, and the one (if any) triggered by the latest input."""

    triggers: dict[str, list[int]] = field(default_factory=dict)
    pending: str | None = None
    once_dir: str | None = None  # each fault fires once across cores (a marker file per fault)

    @classmethod
    def from_env(cls) -> FaultInjector:
        raw = os.environ.get(FAULTS_ENV)
        if not raw:
            return cls()
        spec = json.loads(raw)
        once_dir = spec.pop("once_dir", None)
        triggers = {k: [int(t) for t in v] for k, v in spec.items()}
        unknown = set(triggers) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"{FAULTS_ENV}: unknown faults {sorted(unknown)}")
        logger.warning("fault injection armed: %s", sorted(triggers))
        return cls(triggers, once_dir=once_dir)

    def on_request(self, prompt_token_ids: list[int]) -> None:
        """Arm the fault whose trigger prefix this prompt starts with."""
        for kind, prefix in self.triggers.items():
            if prefix and prompt_token_ids[: len(prefix)] == prefix and self._first(kind):
                logger.warning("fault %r triggered", kind)
                self.pending = kind

    def _first(self, kind: str) -> bool:
        """True unless the fault fires once and some core has fired it already."""
        if self.once_dir is None:
            return True
        try:
            os.close(os.open(os.path.join(self.once_dir, kind), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True

    def take(self) -> str | None:
        kind, self.pending = self.pending, None
        return kind


def hang_forever() -> None:
    """A step that never returns: what a deadlock or a kernel stuck in a loop looks like."""
    while True:
        time.sleep(0.5)
