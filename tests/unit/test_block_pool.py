"""Block pool and KV cache manager: free list, ref counts, prefix hits, LRU eviction (no torch)."""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from surge.engine.block_pool import BlockPool, FreeBlockQueue, KVBlock, KVCacheManager
from surge.engine.request import Request, RequestStatus, SamplingParams

BS = 4


def make_request(req_id: str, prompt: list[int]) -> Request:
    return Request(req_id, list(prompt), SamplingParams(max_tokens=None))


def prefill(kv: KVCacheManager, req: Request) -> tuple[list[int], int]:
    """Look up the prefix, allocate the rest of the prompt, mark it computed (as a step would)."""
    hit_blocks, num_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_hit, hit_blocks)
    req.num_computed_tokens = req.num_tokens
    return hit_blocks, num_hit


def check_invariants(kv: KVCacheManager, live: list[Request]) -> None:
    """Ref counts match the live tables, the free list is exact, the cache map is consistent."""
    pool = kv.block_pool
    free = [b.block_id for b in pool.free_queue]
    assert len(free) == len(set(free)) == kv.num_free_blocks
    holders = Counter(i for req in live for i in kv.get_block_ids(req.req_id))
    for block in pool.blocks:
        assert block.ref_cnt >= 0
        assert block.ref_cnt == holders[block.block_id]
        assert (block.ref_cnt == 0) == (block.block_id in set(free))
    assert kv.num_free_blocks + sum(1 for b in pool.blocks if b.ref_cnt) == kv.num_blocks
    for block_hash, block in pool.cached.items():
        assert block.block_hash == block_hash
    for req in live:
        assert len(set(kv.get_block_ids(req.req_id))) == len(kv.get_block_ids(req.req_id))


def test_free_queue_is_fifo_with_o1_removal() -> None:
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    assert [b.block_id for b in queue] == [0, 1, 3, 4]
    assert queue.popleft().block_id == 0
    queue.append(blocks[0])
    queue.append(blocks[2])
    assert [b.block_id for b in queue] == [1, 3, 4, 0, 2]
    assert queue.num_free == 5


def test_pool_allocate_and_free_counts() -> None:
    pool = BlockPool(4, enable_caching=True)
    got = pool.allocate(3)
    assert [b.ref_cnt for b in got] == [1, 1, 1]
    assert pool.num_free_blocks == 1
    pool.free(got)
    assert pool.num_free_blocks == 4


def test_allocate_slots_fails_without_change() -> None:
    kv = KVCacheManager(3, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(10)))  # 3 blocks
    b = make_request("b", list(range(100, 105)))
    prefill(kv, a)
    assert kv.num_free_blocks == 0 and kv.usage == 1.0
    assert not kv.allocate_slots(b, 5, [])
    assert kv.get_block_ids("b") == [] and kv.num_free_blocks == 0
    # a decode that still fits in a's last block needs no new block
    a.output_token_ids.append(7)
    assert kv.allocate_slots(a, 1)
    assert len(kv.get_block_ids("a")) == 3


def test_prefix_hit_of_three_shared_blocks() -> None:
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    shared = list(range(3 * BS))
    a = make_request("a", shared + [50, 51])
    b = make_request("b", shared + [60])
    prefill(kv, a)
    hit_blocks, num_hit = prefill(kv, b)
    assert num_hit == 3 * BS
    assert hit_blocks == kv.get_block_ids("a")[:3] == kv.get_block_ids("b")[:3]
    assert kv.get_block_ids("a")[3] != kv.get_block_ids("b")[3]
    assert all(kv.block_pool.blocks[i].ref_cnt == 2 for i in hit_blocks)
    assert kv.prefix_cache_queries == a.num_tokens + b.num_tokens
    assert kv.prefix_cache_hits == 3 * BS
    check_invariants(kv, [a, b])


def test_prefix_hit_never_covers_whole_prompt() -> None:
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    prompt = list(range(3 * BS))
    prefill(kv, make_request("a", prompt))
    hit_blocks, num_hit = kv.get_computed_blocks(make_request("b", prompt))
    assert len(hit_blocks) == 2 and num_hit == 2 * BS  # (12 - 1) // 4


def test_hash_chains_on_the_parent() -> None:
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    prefill(kv, make_request("a", [1, 2, 3, 4, 9, 9, 9, 9, 0]))
    # same second block, different first block: no hit at all
    assert kv.get_computed_blocks(make_request("b", [5, 6, 7, 8, 9, 9, 9, 9, 0])) == ([], 0)


def test_prefix_caching_disabled_gives_no_hits() -> None:
    kv = KVCacheManager(16, BS, enable_prefix_caching=False)
    prompt = list(range(3 * BS + 1))
    prefill(kv, make_request("a", prompt))
    assert kv.get_computed_blocks(make_request("b", prompt)) == ([], 0)
    assert not kv.block_pool.cached


def test_freed_cached_blocks_are_reused_then_evicted_lru() -> None:
    kv = KVCacheManager(4, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(2 * BS + 1)))  # 2 full blocks + 1 token
    prefill(kv, a)
    a_blocks = kv.get_block_ids("a")
    a.status = RequestStatus.FINISHED_STOPPED
    kv.free(a)
    assert kv.num_free_blocks == 4
    # freed in reverse: the tail block (uncached, partial) is evicted before the prefix blocks
    assert [b.block_id for b in kv.block_pool.free_queue][-3:] == a_blocks[::-1]
    b = make_request("b", list(range(2 * BS)) + [77])
    hit_blocks, num_hit = kv.get_computed_blocks(b)
    assert hit_blocks == a_blocks[:2] and num_hit == 2 * BS
    assert kv.allocate_slots(b, 1, hit_blocks)
    assert all(kv.block_pool.blocks[i].ref_cnt == 1 for i in hit_blocks)
    assert kv.num_free_blocks == 1
    b.status = RequestStatus.FINISHED_STOPPED
    b.num_computed_tokens = b.num_tokens
    kv.free(b)
    # a fresh 4-block request evicts everything, dropping hashes at that moment
    c = make_request("c", list(range(200, 200 + 4 * BS)))
    assert kv.allocate_slots(c, 4 * BS, [])
    assert kv.get_computed_blocks(make_request("d", list(range(2 * BS)) + [1])) == ([], 0)
    assert len(kv.block_pool.cached) == 4  # only c's own full blocks remain cached
    assert all(b.block_hash in kv.block_pool.cached for b in kv.block_pool.blocks)


def test_eviction_takes_least_recently_freed_first() -> None:
    kv = KVCacheManager(4, BS, enable_prefix_caching=True)
    old = make_request("old", list(range(BS)) + [0])
    new = make_request("new", list(range(100, 100 + BS)) + [0])
    prefill(kv, old)
    prefill(kv, new)
    for req in (old, new):
        req.status = RequestStatus.FINISHED_STOPPED
        kv.free(req)
    # one fresh block: it comes from the head, i.e. from "old"'s blocks
    filler = make_request("f", [999] * 2 * BS)
    assert kv.allocate_slots(filler, 2 * BS, [])
    assert kv.get_computed_blocks(make_request("x", list(range(BS)) + [5])) == ([], 0)
    assert kv.get_computed_blocks(make_request("y", list(range(100, 100 + BS)) + [5]))[1] == BS


def test_preempted_before_compute_forgets_uncomputed_blocks() -> None:
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(3 * BS)))
    assert kv.allocate_slots(a, 3 * BS, [])  # cached at allocation, not yet computed
    assert len(kv.block_pool.cached) == 3
    a.status = RequestStatus.PREEMPTED
    kv.free(a)  # num_computed_tokens is still 0: nothing valid to keep
    assert not kv.block_pool.cached
    assert kv.get_computed_blocks(make_request("b", list(range(3 * BS)) + [1])) == ([], 0)


def test_reset_prefix_cache() -> None:
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(2 * BS + 1)))
    prefill(kv, a)
    assert not kv.reset_prefix_cache()
    a.status = RequestStatus.FINISHED_ABORTED
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_request("b", list(range(2 * BS + 1)))) == ([], 0)


class KVMachine(RuleBasedStateMachine):
    """Random prefills, decodes, chunked steps, preemptions and frees keep every invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(12, BS, enable_prefix_caching=True)
        self.live: dict[str, Request] = {}
        self.next_id = 0

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=20))
    def add(self, prompt: list[int]) -> None:
        req = make_request(f"r{self.next_id}", prompt)
        self.next_id += 1
        hit_blocks, num_hit = self.kv.get_computed_blocks(req)
        assert num_hit < req.num_tokens
        if self.kv.allocate_slots(req, req.num_tokens - num_hit, hit_blocks):
            req.num_computed_tokens = req.num_tokens
            self.live[req.req_id] = req

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 2))
    def decode(self, data: st.DataObject, token: int) -> None:
        req = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        req.output_token_ids.append(token)
        if self.kv.allocate_slots(req, 1):
            req.num_computed_tokens += 1
        else:
            req.output_token_ids.pop()

    @precondition(lambda self: self.live)
    @rule(data=st.data(), computed=st.booleans(), finished=st.booleans())
    def free(self, data: st.DataObject, computed: bool, finished: bool) -> None:
        req = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        if not computed:
            req.num_computed_tokens = 0  # as if the step that cached its blocks never ran
        req.status = RequestStatus.FINISHED_ABORTED if finished else RequestStatus.PREEMPTED
        self.kv.free(req)

    @invariant()
    def consistent(self) -> None:
        check_invariants(self.kv, list(self.live.values()))

    def teardown(self) -> None:
        for req in self.live.values():
            req.status = RequestStatus.FINISHED_ABORTED
            self.kv.free(req)
        assert self.kv.num_free_blocks == self.kv.num_blocks
        assert all(b.ref_cnt == 0 for b in self.kv.block_pool.blocks)


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
