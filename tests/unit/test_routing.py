"""The replica router's rule and the CPU split, as pure functions."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from surge.config import EngineConfig, ReplicaConfig
from surge.engine.block_pool import hash_block
from surge.engine.placement import PlacementError, check_replicas, replica_config, split_evenly
from surge.engine.routing import (
    AffinityGuard,
    ReplicaLoad,
    choose,
    least_loaded,
    prefix_key,
    rendezvous,
    session_key,
)

GUARD = AffinityGuard(margin=4, ratio=0.5)


def loads(*seqs: int) -> list[ReplicaLoad]:
    return [ReplicaLoad(i, n, 0) for i, n in enumerate(seqs)]


def test_least_loaded_prefers_fewest_sequences_then_tokens_then_round_robin() -> None:
    assert least_loaded(loads(3, 1, 2), 0).index == 1
    tied = [ReplicaLoad(0, 2, 500), ReplicaLoad(1, 2, 100), ReplicaLoad(2, 2, 100)]
    assert least_loaded(tied, 0).index == 1
    assert least_loaded(tied, 2).index == 2  # the round-robin start breaks the last tie
    assert [least_loaded(loads(0, 0, 0), start).index for start in range(4)] == [0, 1, 2, 0]


def test_equal_replicas_share_requests_evenly() -> None:
    counts: collections.Counter[int] = collections.Counter()
    rr = 0
    for _ in range(300):
        index, why = choose(loads(0, 0, 0), None, GUARD, rr)
        rr = index + 1
        counts[index] += 1
        assert why == "least_loaded"
    assert counts == {0: 100, 1: 100, 2: 100}


def test_prefix_key_is_the_prefix_caches_block_hash() -> None:
    ids = list(range(100, 180))  # 5 full blocks of 16
    first = hash_block(None, ids[:16])
    assert prefix_key(ids, 16, 1) == first
    assert prefix_key(ids, 16, 2) == hash_block(first, ids[16:32])
    assert prefix_key(ids[:40], 16, 4) == prefix_key(ids, 16, 2)  # only full blocks count
    assert prefix_key(ids[:15], 16, 4) is None
    assert prefix_key(ids, 16, 0) is None


def test_rendezvous_moves_only_the_keys_of_a_replica_that_leaves() -> None:
    keys = [session_key(f"user-{i}") for i in range(400)]
    before = {k: rendezvous(k, [0, 1, 2]) for k in keys}
    after = {k: rendezvous(k, [0, 2]) for k in keys}
    assert set(collections.Counter(before.values())) == {0, 1, 2}
    for k in keys:
        if before[k] != 1:
            assert after[k] == before[k]


def test_affinity_holds_within_the_guard_and_gives_way_beyond_it() -> None:
    key = session_key("alice")
    preferred = rendezvous(key, [0, 1])
    other = 1 - preferred
    busy = [0, 0]
    busy[preferred] = 4  # least + margin: still allowed
    assert choose(loads(*busy), key, GUARD, 0) == (preferred, "affinity")
    busy[preferred] = 5
    assert choose(loads(*busy), key, GUARD, 0) == (other, "guard")
    busy = [20, 20]
    busy[preferred] = 30  # 20 + max(4, 0.5 * 20)
    assert choose(loads(*busy), key, GUARD, 0) == (preferred, "affinity")
    busy[preferred] = 31
    assert choose(loads(*busy), key, GUARD, 0) == (other, "guard")


def test_a_hot_prefix_cannot_pile_work_onto_one_replica() -> None:
    """Every request shares one prefix and none finishes: the preferred replica takes them until
    the guard's bound, then the others fill up (SGLang's "death spiral" can't happen)."""
    key = prefix_key(list(range(64)), 16, 4)
    outstanding = [0, 0, 0]
    for _ in range(300):
        before = list(outstanding)
        index, why = choose(loads(*outstanding), key, GUARD, 0)
        least = min(before)
        assert before[index] <= least + max(4, int(0.5 * least))  # never past the bound
        outstanding[index] += 1
    preferred = rendezvous(key, [0, 1, 2])
    others = [n for i, n in enumerate(outstanding) if i != preferred]
    assert min(others) > 0 and outstanding[preferred] > max(others)  # affinity still counts
    assert outstanding[preferred] <= min(outstanding) + max(4, int(0.5 * min(outstanding))) + 1


def test_split_evenly_and_placement_errors() -> None:
    assert split_evenly([0, 1, 2, 3, 4], 2) == [(0, 1, 2), (3, 4)]
    assert split_evenly([0, 1], 2) == [(0,), (1,)]
    with pytest.raises(PlacementError, match="3 replicas need at least 3 CPUs"):
        split_evenly([0, 1], 3)
    base = EngineConfig()
    config = replica_config(base, ReplicaConfig(), 1, 2, cpus=[0, 1, 2, 3])
    assert config.cpu_affinity == (2, 3) and config.num_threads == 2
    capped = replica_config(
        dataclasses.replace(base, num_threads=1), ReplicaConfig(), 0, 2, [0, 1, 2, 3]
    )
    assert capped.num_threads == 1
    shared = replica_config(base, ReplicaConfig(pin_cpus=False), 0, 8, cpus=[0, 1])
    assert shared == base  # no pinning: every replica may use every CPU, any count
    check_replicas(base, ReplicaConfig(pin_cpus=False), 64)


def test_cuda_replicas_get_one_device_each() -> None:
    base = EngineConfig(device="cuda")
    devices = ReplicaConfig(devices=("0", "cuda:3"))
    assert replica_config(base, devices, 1, 2).device == "cuda:3"
    assert replica_config(base, devices, 0, 2).device == "cuda:0"
    with pytest.raises(PlacementError, match="3 replicas on CUDA need 3 devices"):
        check_replicas(base, devices, 3)


def test_replica_config_is_validated() -> None:
    with pytest.raises(ValueError, match="replicas must be an integer >= 1"):
        ReplicaConfig(replicas=0)
    with pytest.raises(ValueError):
        ReplicaConfig(max_failovers=-1)
