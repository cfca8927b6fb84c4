"""Paged attention over a flat (varlen) batch: the metadata the runner builds once per step.

Layout contract (shared by the model runner, the models and the tests):
- The flat batch holds every scheduled token of the step; sequences are laid out in order, and
  every sequence with exactly one new token ("decode") comes before every sequence with more.
- The KV cache of one layer is a pair of tensors [num_slots, num_kv_heads, head_dim], where
  num_slots = num_blocks * block_size and slot = block_id * block_size + offset_in_block.
- Each layer first writes the new tokens' K/V into their slots (for the whole batch), then
  attends. Because all writes precede all reads within a layer, a sequence may read blocks that
  another sequence of the same step is filling (a prefix-cache hit on a block computed this step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from surge.kernels import CpuKernels


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step attention inputs, built once by the runner and shared by all layers."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: the KV slot each new token writes
    block_size: int
    num_decodes: int  # the first num_decodes sequences (and tokens) are single-token decodes
    # decodes, for the fused kernel: each sequence's blocks and length
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int32 (padding -> 0)
    decode_context_lens: torch.Tensor | None  # [num_decodes] int32
    # decodes, for the torch path (built only when asked for): a padded gather of each context
    decode_slots: torch.Tensor | None  # [num_decodes, max_decode_len] int64 (padding -> slot 0)
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_decode_len] bool, True = attend
    # prefills (and chunks) for SDPA, one entry per sequence after the decodes (none when the
    # decode kernel takes every prefill row: prefill_rows)
    prefill_query_starts: list[int]  # token offset of each sequence in the flat batch
    prefill_query_lens: list[int]
    prefill_context_lens: list[int]  # tokens in context after this step (cached + new)
    prefill_slots: list[torch.Tensor]  # [context_len] int64 slots of each sequence's context
    prefill_masks: list[torch.Tensor | None]  # [query_len, context_len] bool, None = plain causal
    # prefill rows the fused path attends with the decode kernel, one row at a time, each over
    # its own prefix, exactly as a decode: a row's bits depend only on its sequence and position,
    # never on how its prompt was chunked or batched, or on whether its token was generated
    # before (recomputed after a preemption, resumed on another replica). On this CPU it was
    # also 1.5-3x faster than torch's SDPA per sequence, from 64-token bursts to 4k prompts.
    prefill_rows: torch.Tensor | None = None  # [R] int64 flat token indices
    prefill_row_block_tables: torch.Tensor | None = None  # [R, max_blocks] int32 (padding -> 0)
    prefill_row_context_lens: torch.Tensor | None = None  # [R] int32: each row's position + 1


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
    decode_gather: bool = True,
    rows_by_decode_kernel: bool = False,
) -> AttentionMetadata:
    """Build the step's metadata; decodes (query_len == 1) should come first.

    decode_gather=False skips the padded slot gather that only the torch decode path reads.
    rows_by_decode_kernel: every prefill row is listed for the decode kernel (prefill_rows), and
    none for SDPA (the fused path; see AttentionMetadata).

    context_lens[i] counts the sequence's tokens after this step (already cached + new), so the
    new tokens sit at positions [context_len - query_len, context_len). Ordering decodes first is
    for speed only: a single-token sequence after a prefill is handled as a one-row prefill.
    """
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    slot_mapping: list[int] = []
    for q, ctx, table in zip(query_lens, context_lens, block_tables, strict=True):
        if q > ctx:
            raise ValueError(f"query_len {q} exceeds context_len {ctx}")
        slot_mapping.extend(_slots(table, ctx - q, ctx, block_size))
    decode_slots = decode_mask = decode_tables = decode_lens = None
    if num_decodes:
        max_blocks = max(len(t) for t in block_tables[:num_decodes])
        decode_tables = torch.tensor(
            [t + [0] * (max_blocks - len(t)) for t in block_tables[:num_decodes]],
            dtype=torch.int32,
            device=device,
        )
        decode_lens = torch.tensor(context_lens[:num_decodes], dtype=torch.int32, device=device)
    if num_decodes and decode_gather:
        max_len = max(context_lens[:num_decodes])
        rows = []
        for ctx, table in zip(context_lens[:num_decodes], block_tables[:num_decodes], strict=True):
            rows.append(_slots(table, 0, ctx, block_size) + [0] * (max_len - ctx))
        decode_slots = torch.tensor(rows, dtype=torch.int64, device=device)
        lens = torch.tensor(context_lens[:num_decodes], dtype=torch.int64, device=device)
        decode_mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[
            :, None, None, :
        ]
    starts, p_q, p_ctx, p_slots, p_masks = [], [], [], [], []
    row_seq: list[int] = []  # each decode-kernel row's sequence (index among the prefills)
    row_pos: list[torch.Tensor] = []  # their positions, per sequence
    offset = num_decodes
    for i, (q, ctx, table) in enumerate(
        zip(
            query_lens[num_decodes:],
            context_lens[num_decodes:],
            block_tables[num_decodes:],
            strict=True,
        )
    ):
        if rows_by_decode_kernel:
            row_seq.extend([i] * q)
            row_pos.append(torch.arange(ctx - q, ctx, dtype=torch.int32))
        else:
            starts.append(offset)
            p_q.append(q)
            p_ctx.append(ctx)
            p_slots.append(torch.tensor(_slots(table, 0, ctx, block_size), device=device))
            # query row j sits at position ctx - q + j and sees every position up to it
            p_masks.append(
                None
                if q == ctx
                else torch.ones(q, ctx, dtype=torch.bool, device=device).tril(ctx - q)
            )
        offset += q
    rows = row_tables = row_lens = None
    if row_seq:
        tables = block_tables[num_decodes:]
        width = max(len(t) for t in tables)
        seq_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        rows = torch.arange(num_decodes, offset, dtype=torch.int64, device=device)
        row_tables = seq_tables[torch.tensor(row_seq)].to(device)
        row_lens = (torch.cat(row_pos) + 1).to(device)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        block_size=block_size,
        num_decodes=num_decodes,
        decode_block_tables=decode_tables,
        decode_context_lens=decode_lens,
        decode_slots=decode_slots,
        decode_mask=decode_mask,
        prefill_query_starts=starts,
        prefill_query_lens=p_q,
        prefill_context_lens=p_ctx,
        prefill_slots=p_slots,
        prefill_masks=p_masks,
        prefill_rows=rows,
        prefill_row_block_tables=row_tables,
        prefill_row_context_lens=row_lens,
    )


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Slots of positions [start, end) of one sequence; one range per block, not per token."""
    if end > len(block_table) * block_size:
        raise ValueError(f"block table of {len(block_table)} blocks cannot hold {end} tokens")
    slots: list[int] = []
    pos = start
    while pos < end:
        block, offset = divmod(pos, block_size)
        take = min(block_size - offset, end - pos)
        base = block_table[block] * block_size + offset
        slots.extend(range(base, base + take))
        pos += take
    return slots


def allocate_kv_caches(
    model: torch.nn.Module,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (k_cache, v_cache) pair per layer, each [num_blocks * block_size, num_kv_heads, head_dim]."""
    shape = (num_blocks * block_size, model.num_kv_heads, model.head_dim)
    # zeros, not empty: padded decode rows gather slot 0, and NaN garbage there would leak
    # through the masked softmax (NaN * 0 = NaN)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(model.num_layers)
    ]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Reference ("torch") backend: q [T, H, D], k/v [T, Hkv, D] -> out [T, H, D]."""
    # all writes before all reads: a sequence may read blocks another one fills this step
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        if meta.decode_slots is None:
            raise ValueError("metadata built with decode_gather=False: the torch path needs it")
        # [B, L, Hkv, D] -> [B, Hkv, L, D]
        keys = k_cache[meta.decode_slots].transpose(1, 2)
        values = v_cache[meta.decode_slots].transpose(1, 2)
        # Padding to the batch's longest context moves a row's last bits with its batch mates
        # (fused SDPA sums over the padded length); so do the vendor GEMMs of the linears,
        # whatever we do here. A per-length-bucket float32 matmul path was bit-invariant but
        # 0.79x the throughput at batch 64 (BENCHMARKS.md), so it was not kept.
        # each kv head's query group becomes the query length: one plain SDPA with no GQA
        # expansion (about 2x faster than enable_gqa on CPU in bf16); the mask broadcasts
        num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
        grouped = q[:nd].view(nd, num_kv_heads, -1, head_dim)
        o = F.scaled_dot_product_attention(
            grouped, keys, values, attn_mask=meta.decode_mask, scale=scale
        )
        out[:nd] = o.reshape(nd, -1, head_dim)
    _prefill_attention(q, k, v, k_cache, v_cache, meta, scale, out)
    return out


def fused_paged_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    num_heads: int,
    scale: float,
    interleaved: bool,
    kernels: CpuKernels,
) -> torch.Tensor:
    """CPU kernel backend on the fused qkv rows [T, (H + 2 Hkv) * D] -> out [T, H * D].

    Rotary and the cache write run in one kernel over every token, then the decode attention
    kernel straight from the blocks (no gather): the decodes in one call, and the prefill rows
    the metadata lists (prefill_rows) in another; any other prefill gets the torch path's SDPA.
    cos/sin: float32 [T, 1, rotary_dim // 2].
    """
    num_tokens = qkv.shape[0]
    num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    kernels.rope_and_cache(
        qkv, cos, sin, meta.slot_mapping, k_cache, v_cache, num_heads, interleaved
    )
    q, k, v = qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    q = q.view(num_tokens, num_heads, head_dim)
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    nd = meta.num_decodes
    if nd:
        kernels.decode_attention(
            out[:nd],
            q[:nd],
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_context_lens,
            meta.block_size,
            scale,
        )
    _prefill_attention(
        q,
        k.view(num_tokens, num_kv_heads, head_dim),
        v.view(num_tokens, num_kv_heads, head_dim),
        k_cache,
        v_cache,
        meta,
        scale,
        out,
    )
    if meta.prefill_rows is not None:
        rows = meta.prefill_rows
        attended = torch.empty((rows.numel(), num_heads, head_dim), dtype=out.dtype)
        kernels.decode_attention(
            attended,
            q[rows],
            k_cache,
            v_cache,
            meta.prefill_row_block_tables,
            meta.prefill_row_context_lens,
            meta.block_size,
            scale,
        )
        out[rows] = attended
    return out.view(num_tokens, -1)


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> None:
    """One SDPA per prefilling sequence with rows the decode kernel does not attend (the only
    loop per layer), written into out."""
    for start, qlen, slots, mask in zip(
        meta.prefill_query_starts,
        meta.prefill_query_lens,
        meta.prefill_slots,
        meta.prefill_masks,
        strict=True,
    ):
        end = start + qlen
        if mask is None:  # whole context is new: attend to the fresh k/v, skip the gather
            keys, values = k[start:end], v[start:end]
        else:
            keys, values = k_cache[slots], v_cache[slots]
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[start:end] = o.transpose(0, 1)
