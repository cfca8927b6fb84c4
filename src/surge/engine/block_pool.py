"""Paged KV blocks: an O(1) free list, ref counts, prefix hashes with LRU eviction.

`BlockPool` owns the physical blocks; `KVCacheManager` owns each request's block table and is
the only thing the scheduler talks to. No torch here: block ids index the model runner's tensors.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from surge.engine.request import Request

# sha256(parent block's hash + this block's token ids as int64): it chains the whole prefix into
# each key, and being collision-resistant, one tenant can't craft a prompt whose block maps onto
# another tenant's cached KV (Python's 64-bit hash() of the parent could be collided).
BlockHash = bytes
_ROOT_HASH = hashlib.sha256(b"surge prefix cache root").digest()  # parent of a first block


def hash_block(parent: BlockHash | None, token_ids: Iterable[int]) -> BlockHash:
    """Key of a full block: chained from its parent block's key and its own token ids."""
    h = hashlib.sha256(_ROOT_HASH if parent is None else parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(slots=True, eq=False)
class KVBlock:
    """One physical block; `prev_free`/`next_free` link it into the free list while ref_cnt == 0."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    prev_free: KVBlock | None = None
    next_free: KVBlock | None = None


class FreeBlockQueue:
    """Doubly linked list of free blocks: O(1) popleft, append and removal from the middle.

    Head = least recently freed, so it is evicted first; cached blocks stay here until then.
    """

    def __init__(self, blocks: list[KVBlock]) -> None:
        self._head = KVBlock(-1)  # sentinels: no None checks on the hot path
        self._tail = KVBlock(-2)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVBlock:
        """Take the least recently freed block."""
        block = self._head.next_free
        if block is None or block is self._tail:
            raise RuntimeError("no free KV blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        """Unlink `block` from wherever it sits (a prefix hit on a free cached block)."""
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise RuntimeError(f"block {block.block_id} is not in the free list")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def append(self, block: KVBlock) -> None:
        """Put `block` at the tail (most recently freed, evicted last)."""
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def __iter__(self) -> Iterator[KVBlock]:
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


class BlockPool:
    """All KV blocks, their ref counts, and the prefix-cache map from block hash to block."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take `num_blocks` fresh blocks from the head, evicting their cached hashes now."""
        if num_blocks > self.free_queue.num_free:
            raise RuntimeError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                self.uncache(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on prefix-hit blocks; a free one leaves the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference per block; blocks reaching zero go to the tail in the given order."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} freed twice")
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash)

    def cache(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a full block; if an equal block is already cached, this one stays private."""
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block

    def uncache(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def reset_cache(self) -> bool:
        """Forget every hash; refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()
        return True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Per-request block tables over a `BlockPool`, with prefix-cache lookups and hit stats."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching)
        self._tables: dict[str, list[KVBlock]] = {}
        self._table_ids: dict[str, list[int]] = {}  # the same tables as ints, kept in step
        self._num_cached: dict[str, int] = {}  # leading blocks of a table already hashed+cached
        # Hashes survive preemption (tokens are only ever appended), so a resumed request does
        # not rehash its prompt; dropped when the request finishes.
        self._hashes: dict[str, list[BlockHash]] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_block_ids(self, req_id: str) -> list[int]:
        """A copy of the request's block table (empty if it holds none)."""
        return list(self._table_ids.get(req_id, ()))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of a request holding no blocks: (block ids, num tokens)."""
        if not self.enable_prefix_caching or request.req_id in self._tables:
            return [], 0
        # The last token must be computed to sample from it, so never hit the whole prompt.
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_blocks)
        hit: list[int] = []
        for block_hash in hashes[:max_blocks]:
            block = self.block_pool.lookup(block_hash)
            if block is None:
                break
            hit.append(block.block_id)
        return hit, len(hit) * self.block_size

    def num_blocks_needed(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[int] | None = None
    ) -> int:
        """Free blocks `allocate_slots` would consume (fresh ones plus free cached hits)."""
        hits = new_computed_blocks or []
        num_tokens = request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        held = len(self._tables.get(request.req_id, ()))
        num_fresh = max(0, _cdiv(num_tokens, self.block_size) - held - len(hits))
        blocks = self.block_pool.blocks
        return num_fresh + sum(1 for i in hits if blocks[i].ref_cnt == 0)

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[int] | None = None
    ) -> bool:
        """Grow the table to cover computed + hit + new tokens; False and no change if short."""
        if self.num_blocks_needed(request, num_new_tokens, new_computed_blocks) > (
            self.num_free_blocks
        ):
            return False
        req_id = request.req_id
        table = self._tables.setdefault(req_id, [])
        table_ids = self._table_ids.setdefault(req_id, [])
        hits = [self.block_pool.blocks[i] for i in new_computed_blocks or ()]
        if hits:
            self.block_pool.touch(hits)  # before allocating, so fresh blocks cannot evict them
            table.extend(hits)
            table_ids.extend(new_computed_blocks or ())
            self._num_cached[req_id] = len(hits)
        num_tokens = request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        fresh = self.block_pool.allocate(max(0, _cdiv(num_tokens, self.block_size) - len(table)))
        table.extend(fresh)
        table_ids.extend(b.block_id for b in fresh)
        if new_computed_blocks is not None and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(hits) * self.block_size
        if self.enable_prefix_caching:
            # Cached now, before the step computes them: a request hitting them in this same
            # step reads K/V the runner writes for the whole batch before each layer attends.
            self._cache_full_blocks(request, min(num_tokens, request.num_tokens))
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so its tail blocks are evicted first."""
        req_id = request.req_id
        table = self._tables.pop(req_id, [])
        self._table_ids.pop(req_id, None)
        self._num_cached.pop(req_id, None)
        if request.is_finished:
            self._hashes.pop(req_id, None)
        # Blocks past the computed tokens were cached for K/V a step had yet to write; if that
        # step never ran (preempted, failed) they hold garbage, so forget them. Dropping the
        # hash of a block another request shares costs a cache entry, never correctness.
        first_invalid = request.num_computed_tokens // self.block_size
        for block in table[first_invalid:]:
            self.block_pool.uncache(block)
        self.block_pool.free(reversed(table))

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; False while any block is in use."""
        return self.block_pool.reset_cache()

    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """Hashes of the request's first `num_blocks` full blocks, computed once and kept."""
        hashes = self._hashes.setdefault(request.req_id, [])
        bs = self.block_size
        for i in range(len(hashes), num_blocks):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, request.token_ids_slice(i * bs, (i + 1) * bs)))
        return hashes

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        num_full = num_tokens // self.block_size
        start = self._num_cached.get(request.req_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        table = self._tables[request.req_id]
        for i in range(start, num_full):
            self.block_pool.cache(table[i], hashes[i])
        self._num_cached[request.req_id] = num_full
