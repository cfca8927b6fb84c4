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

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step attention inputs, built once by the runner and shared by all layers."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: the KV slot each new token writes
    num_decodes: int  # the first num_decodes sequences (and tokens) are single-token decodes
    # decodes: a padded gather of each sequence's whole context
    decode_slots: torch.Tensor | None  # [num_decodes, max_decode_len] int64 (padding -> slot 0)
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_decode_len] bool, True = attend
    # prefills (and chunks), one entry per sequence after the decodes
    prefill_query_starts: list[int]  # token offset of each sequence in the flat batch
    prefill_query_lens: list[int]
    prefill_context_lens: list[int]  # tokens in context after this step (cached + new)
    prefill_slots: list[torch.Tensor]  # [context_len] int64 slots of each sequence's context
    prefill_masks: list[torch.Tensor | None]  # [query_len, context_len] bool, None = plain causal

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Build the step's metadata; sequences must come decodes (query_len == 1) first.

    context_lens[i] counts the sequence's tokens after this step (already cached + new), so the
    new tokens sit at positions [context_len - query_len, context_len).
    """
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    slot_mapping: list[int] = []
    for q, ctx, table in zip(query_lens, context_lens, block_tables, strict=True):
        for pos in range(ctx - q, ctx):
            slot_mapping.append(table[pos // block_size] * block_size + pos % block_size)
    decode_slots = decode_mask = None
    if num_decodes:
        max_len = max(context_lens[:num_decodes])
        rows = []
        for ctx, table in zip(context_lens[:num_decodes], block_tables[:num_decodes], strict=True):
            row = _context_slots(table, ctx, block_size)
            rows.append(row + [0] * (max_len - ctx))
        decode_slots = torch.tensor(rows, dtype=torch.int64, device=device)
        lens = torch.tensor(context_lens[:num_decodes], device=device)
        decode_mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
    starts, p_q, p_ctx, p_slots, p_masks = [], [], [], [], []
    offset = num_decodes
    for q, ctx, table in zip(
        query_lens[num_decodes:], context_lens[num_decodes:], block_tables[num_decodes:], strict=True
    ):
        starts.append(offset)
        offset += q
        p_q.append(q)
        p_ctx.append(ctx)
        p_slots.append(torch.tensor(_context_slots(table, ctx, block_size), dtype=torch.int64, device=device))
        if q == ctx:
            p_masks.append(None)
        else:
            p_masks.append(torch.ones(q, ctx, dtype=torch.bool, device=device).tril(diagonal=ctx - q))
    return AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        num_decodes=num_decodes,
        decode_slots=decode_slots,
        decode_mask=decode_mask,
        prefill_query_starts=starts,
        prefill_query_lens=p_q,
        prefill_context_lens=p_ctx,
        prefill_slots=p_slots,
        prefill_masks=p_masks,
    )


def _context_slots(block_table: list[int], context_len: int, block_size: int) -> list[int]:
    """Slots of positions [0, context_len) of one sequence."""
    slots: list[int] = []
    for i, block in enumerate(block_table):
        base = block * block_size
        take = min(block_size, context_len - i * block_size)
        if take <= 0:
            break
        slots.extend(range(base, base + take))
    return slots


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
    raise NotImplementedError  # written by the models work; see the module docstring
