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
    AffinityTable,
    ReplicaLoad,
    choose,
    least_loaded,
    prefix_keys,
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
    table = AffinityTable()
    for i in range(300):  # unrelated prompts: their keys are new, so load alone decides
        keys = prefix_keys(list(range(i * 100, i * 100 + 64)), 16, 4)
        index, why = choose(loads(0, 0, 0), keys, table, GUARD, rr)
        rr = index + 1
        counts[index] += 1
        assert why == "least_loaded"
    assert counts == {0: 100, 1: 100, 2: 100}


def test_prefix_keys_are_the_prefix_caches_block_hashes() -> None:
    ids = list(range(100, 180))  # 5 full blocks of 16
    first = hash_block(None, ids[:16])
    assert prefix_keys(ids, 16, 2) == [first, hash_block(first, ids[16:32])]
    assert prefix_keys(ids[:40], 16, 4) == prefix_keys(ids, 16, 2)  # only full blocks count
    assert prefix_keys(ids[:15], 16, 4) == []
    assert prefix_keys(ids, 16, 0) == []


def test_a_shared_prefix_goes_where_its_cache_is() -> None:
    table = AffinityTable()
    system = list(range(500, 532))  # 2 shared blocks, then each user's own text
    first = prefix_keys(system + list(range(10, 42)), 16, 4)
    assert choose(loads(0, 0, 0), first, table, GUARD, 1) == (1, "least_loaded")
    # a later prompt sharing only the first 2 blocks prefers the replica holding them
    second = prefix_keys(system + list(range(60, 92)), 16, 4)
    assert choose(loads(0, 1, 0), second, table, GUARD, 0) == (1, "affinity")
    # the deepest shared key wins: replica 2 holds all 4 blocks of this prompt
    table.record(first, 2)
    assert choose(loads(3, 1, 2), first, table, GUARD, 0) == (1, "affinity")  # 1 and 2 hold it
    assert choose(loads(3, 4, 2), first, table, GUARD, 0) == (2, "affinity")
    table.forget(1)  # replica 1 restarted: its cache is gone
    assert table.holders(second, {0, 1, 2}) == {2}


def test_affinity_holds_within_the_guard_and_gives_way_beyond_it() -> None:
    table = AffinityTable()
    key = [session_key("alice")]
    table.record(key, 0)
    assert choose(loads(4, 0), key, table, GUARD, 0) == (0, "affinity")  # least + margin
    assert choose(loads(5, 0), key, table, GUARD, 0) == (1, "guard")
    assert table.holders(key, {0, 1}) == {0, 1}  # the guard's choice now holds it too
    table = AffinityTable()
    table.record(key, 0)
    assert choose(loads(30, 20), key, table, GUARD, 0) == (0, "affinity")  # 20 + max(4, 10)
    assert choose(loads(31, 20), key, table, GUARD, 0) == (1, "guard")


def test_a_hot_prefix_cannot_pile_work_onto_one_replica() -> None:
    """Every request shares one prefix and none finishes: the replica holding it takes them up
    to the guard's bound, then the prefix spreads (SGLang's "death spiral" can't happen)."""
    keys = prefix_keys(list(range(64)), 16, 4)
    table = AffinityTable()
    outstanding = [0, 0, 0]
    whys: collections.Counter[str] = collections.Counter()
    for _ in range(300):
        before = list(outstanding)
        index, why = choose(loads(*outstanding), keys, table, GUARD, 0)
        whys[why] += 1
        least = min(before)
        assert before[index] <= least + max(4, int(0.5 * least))  # never past the bound
        outstanding[index] += 1
    assert min(outstanding) > 0 and max(outstanding) - min(outstanding) <= 1
    assert whys["affinity"] > whys["guard"] > 0


def test_the_table_is_bounded() -> None:
    table = AffinityTable(capacity=8)
    for i in range(20):
        table.record([session_key(str(i))], i % 2)
    assert len(table) == 8
    assert table.holders([session_key("0")], {0, 1}) == set()  # the oldest were forgotten
    assert table.holders([session_key("19")], {0, 1}) == {1}


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
