"""Process hygiene shared by the API server, the engine core and the encoder workers."""

from __future__ import annotations

import ctypes
import gc
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


def freeze_loaded_objects(*, collect: bool) -> None:
    """Put every object alive now (a loaded model, its modules, tokenizers, imported code) out
    of the garbage collector's reach: otherwise each full collection walks them all again, and
    in the API server those were 200-470 ms pauses of its event loop every few seconds under
    load, a stall in every stream. `collect` first frees what is garbage already (start-up;
    skip it at run time, where the collection itself is such a pause)."""
    if collect:
        gc.collect()
    gc.freeze()
