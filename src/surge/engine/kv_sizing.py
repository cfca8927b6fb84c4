"""KV cache sizing: bytes per token and per block, and how many blocks a memory budget holds.

One copy of the arithmetic, called by the model runner (what it allocates), the router's memory
estimate and `surge plan` (what it predicts), so the three can't drift apart. No torch here.
"""

from __future__ import annotations


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V of one token over every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def kv_bytes_per_block(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int, block_size: int
) -> int:
    """One paged block: `block_size` tokens' K and V over every layer (allocate_kv_caches' shape)."""
    return block_size * kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype_bytes)


def num_blocks_for_memory(num_bytes: int, bytes_per_block: int) -> int:
    """Whole blocks that fit in `num_bytes`; ValueError when not even one does."""
    num_blocks = num_bytes // bytes_per_block
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory={num_bytes} bytes holds no KV block; raise it")
    return int(num_blocks)


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks a sequence of `num_tokens` tokens holds (the KV cache manager's ceil division)."""
    return -(-num_tokens // block_size)
