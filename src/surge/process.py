"""Child-process hygiene shared by the engine core and the encoder workers."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a child must never outlive it);
    elsewhere the child's own parent check is all there is."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def ignore_group_signals() -> None:
    """Ignore SIGINT and SIGTERM: Ctrl-C and `kill -TERM -PGID` (systemd, docker) reach the
    whole process group, and the parent drains first, then stops its children itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
