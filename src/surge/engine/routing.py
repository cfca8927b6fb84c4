"""Which replica of a model takes a request: least outstanding work, with prefix and session
affinity held in check by a load guard. No I/O: load snapshots in, a replica index out.

The rule (defaults in ReplicaConfig):
1. Candidates are the replicas that are live, ready and not draining.
2. Load is what the engine core last reported (running + waiting sequences, prompt tokens still
   to prefill) plus what was sent to it since and not yet counted in a report. It is never the
   API's own count of requests it thinks are in flight, which is how routers drift away from
   the truth and pile work onto one replica ("death spiral").
3. The least-loaded candidate: fewest outstanding sequences, then fewest outstanding prompt
   tokens, then the next in round-robin order (so equal replicas share evenly).
4. Affinity keys: the client's session if it names one, else the prefix cache's hashes of the
   prompt's first 1, 2, ... affinity_blocks full KV blocks. The AffinityTable remembers which
   replicas recently served each key (so hold its KV blocks); a replica's keys are forgotten
   when its core restarts. The deepest key some candidate holds picks the holders, and the
   least-loaded holder takes the request unless it carries more than
   max(affinity_margin, affinity_ratio * least) sequences beyond the least-loaded candidate:
   then that one takes it ("guard") and becomes a holder too. So a key nobody holds goes by
   load alone, a shared prefix stays where its cache is, and a hot prefix spreads to more
   replicas as it outgrows one, never piling everything onto one.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

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


def prefix_keys(token_ids: Sequence[int], block_size: int, num_blocks: int) -> list[BlockHash]:
    """The prefix cache's hashes of the prompt's first 1, 2, ... num_blocks full blocks (fewer
    for a shorter prompt; none without one full block)."""
    keys: list[BlockHash] = []
    key: BlockHash | None = None
    for i in range(min(len(token_ids) // block_size, num_blocks)):
        key = hash_block(key, token_ids[i * block_size : (i + 1) * block_size])
        keys.append(key)
    return keys


def session_key(session: str) -> bytes:
    """Affinity key of a client-named session (the `user` field or the session header)."""
    return hashlib.sha256(b"surge session\0" + session.encode("utf-8", "surrogatepass")).digest()


@dataclass(slots=True)
class AffinityTable:
    """Which replicas recently served each affinity key; the least recently used keys are
    forgotten past `capacity`."""

    capacity: int = 100_000
    _holders: OrderedDict[bytes, set[int]] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._holders)

    def holders(self, keys: Sequence[bytes], candidates: set[int]) -> set[int]:
        """The candidates holding the deepest key that any candidate holds (empty if none)."""
        for key in reversed(keys):
            found = self._holders.get(key)
            if found is not None and found & candidates:
                return found & candidates
        return set()

    def record(self, keys: Sequence[bytes], index: int) -> None:
        """Replica `index` now serves (and caches) these keys."""
        for key in keys:
            found = self._holders.get(key)
            if found is None:
                self._holders[key] = {index}
            else:
                found.add(index)
                self._holders.move_to_end(key)
        while len(self._holders) > self.capacity:
            self._holders.popitem(last=False)

    def forget(self, index: int) -> None:
        """Replica `index` lost its cache (its core restarted, or it was removed)."""
        for key in [k for k, found in self._holders.items() if index in found]:
            found = self._holders[key]
            found.discard(index)
            if not found:
                del self._holders[key]


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
    loads: Sequence[ReplicaLoad],
    keys: Sequence[bytes],
    table: AffinityTable,
    guard: AffinityGuard,
    rr: int,
) -> tuple[int, str]:
    """(replica index, why: "affinity", "least_loaded" or "guard"); records the choice in the
    table. `loads` must not be empty."""
    least = least_loaded(loads, rr)
    chosen, why = least, "least_loaded"
    holders = table.holders(keys, {load.index for load in loads}) if len(loads) > 1 else set()
    if holders:
        preferred = least_loaded([load for load in loads if load.index in holders], rr)
        chosen, why = (
            (preferred, "affinity") if guard.allows(preferred, least) else (least, "guard")
        )
    table.record(keys, chosen.index)
    return chosen.index, why
