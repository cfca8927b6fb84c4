"""Which replica of a model takes a request: least outstanding work, with prefix and session
affinity held in check by a load guard. Pure functions over load snapshots; no I/O.

The rule (defaults in ReplicaConfig):
1. Candidates are the replicas that are live, ready and not draining.
2. Load is what the engine core last reported (running + waiting sequences, prompt tokens still
   to prefill) plus what was sent to it since and not yet counted in a report. It is never the
   API's own count of requests it thinks are in flight, which is how routers drift away from
   the truth and pile work onto one replica ("death spiral").
3. The least-loaded candidate: fewest outstanding sequences, then fewest outstanding prompt
   tokens, then the next in round-robin order (so equal replicas share evenly).
4. A request with an affinity key (the client's session, else its prompt's first KV blocks)
   prefers one replica, chosen by rendezvous hashing over the candidates (a replica leaving
   moves only its own keys). It goes there unless that replica's outstanding sequences exceed
   the least-loaded one's by more than max(affinity_margin, affinity_ratio * least): then it
   goes to the least-loaded one. So a hot prefix can hold at most that many more sequences than
   the least busy replica, never all of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from surge.engine.block_pool import BlockHash, hash_block


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One candidate replica's outstanding work, as the router sees it."""

    index: int
    num_seqs: int  # running + waiting in the core, plus sent and not yet reported
    num_tokens: int  # prompt tokens still to prefill, plus those of sequences sent since


@dataclass(frozen=True, slots=True)
class AffinityGuard:
    """How much busier than the least-loaded replica a preferred one may be (see module doc)."""

    margin: int = 4  # sequences
    ratio: float = 0.5  # of the least-loaded replica's sequences

    def allows(self, preferred: ReplicaLoad, least: ReplicaLoad) -> bool:
        """True while the preferred replica is within the bound of the least-loaded one."""
        slack = max(self.margin, int(self.ratio * least.num_seqs))
        return preferred.num_seqs <= least.num_seqs + slack


def prefix_key(token_ids: Sequence[int], block_size: int, num_blocks: int) -> BlockHash | None:
    """The prefix cache's hash of the prompt's first `num_blocks` full blocks (fewer if the
    prompt is shorter); None for a prompt without one full block."""
    full = min(len(token_ids) // block_size, num_blocks)
    key: BlockHash | None = None
    for i in range(full):
        key = hash_block(key, token_ids[i * block_size : (i + 1) * block_size])
    return key


def session_key(session: str) -> bytes:
    """Affinity key of a client-named session (the `user` field or the session header)."""
    return hashlib.sha256(b"surge session\0" + session.encode("utf-8", "surrogatepass")).digest()


def rendezvous(key: bytes, indexes: Sequence[int]) -> int:
    """The replica index with the highest hash of (key, index): stable as replicas come and go."""
    return max(
        indexes,
        key=lambda i: hashlib.blake2b(key + i.to_bytes(4, "little"), digest_size=8).digest(),
    )


def least_loaded(loads: Sequence[ReplicaLoad], start: int) -> ReplicaLoad:
    """Fewest sequences, then fewest tokens, then the first at or after `start` in index order."""
    indexes = sorted(load.index for load in loads)
    order = {
        i: (pos - _first_at_or_after(indexes, start)) % len(indexes)
        for pos, i in enumerate(indexes)
    }
    return min(loads, key=lambda load: (load.num_seqs, load.num_tokens, order[load.index]))


def _first_at_or_after(indexes: list[int], start: int) -> int:
    for pos, i in enumerate(indexes):
        if i >= start:
            return pos
    return 0


def choose(
    loads: Sequence[ReplicaLoad], affinity: bytes | None, guard: AffinityGuard, rr: int
) -> tuple[int, str]:
    """(replica index, why: "affinity", "least_loaded" or "guard"); `loads` must not be empty."""
    least = least_loaded(loads, rr)
    if affinity is None or len(loads) == 1:
        return least.index, "least_loaded"
    preferred_index = rendezvous(affinity, [load.index for load in loads])
    preferred = next(load for load in loads if load.index == preferred_index)
    if guard.allows(preferred, least):
        return preferred.index, "affinity"
    return least.index, "guard"
