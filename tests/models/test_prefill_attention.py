"""The prefill half of paged attention: right against a float64 reference (fresh prompts and
chunks after a cached prefix, grouped-query heads), the same bits for a sequence alone or in a
batch, and on the fused path every prefill row attended by the decode kernel, so a row's bits
do not depend on how its prompt was chunked."""

from __future__ import annotations

import pytest
import torch

from surge.kernels import load_cpu_kernels
from surge.models.attention import build_attention_metadata, paged_attention

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 32, 16
SCALE = DIM**-0.5


def _run(query_lens: list[int], context_lens: list[int]):  # type: ignore[no-untyped-def]
    """q/k/v for the step's new tokens, a cache holding every sequence's earlier tokens, and the
    attention output. Sequence i owns blocks [8 i, 8 i + 8), and its inputs are drawn from its
    own seed, so they are the same whatever else is in the batch."""
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(query_lens))]
    k_cache = torch.zeros(8 * 4 * BLOCK, KV_HEADS, DIM)
    v_cache = torch.zeros(k_cache.shape)
    qs, ks, vs = [], [], []
    for i, qlen in enumerate(query_lens):
        gen = torch.Generator().manual_seed(i)
        rows = slice(8 * i * BLOCK, 8 * (i + 1) * BLOCK)
        k_cache[rows] = torch.randn(8 * BLOCK, KV_HEADS, DIM, generator=gen)
        v_cache[rows] = torch.randn(8 * BLOCK, KV_HEADS, DIM, generator=gen)
        qs.append(torch.randn(qlen, HEADS, DIM, generator=gen))
        ks.append(torch.randn(qlen, KV_HEADS, DIM, generator=gen))
        vs.append(torch.randn(qlen, KV_HEADS, DIM, generator=gen))
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    k_cache, v_cache, q, k, v = (t.to(torch.bfloat16) for t in (k_cache, v_cache, q, k, v))
    meta = build_attention_metadata(query_lens, context_lens, tables, BLOCK)
    out = paged_attention(q, k, v, k_cache, v_cache, meta, SCALE)
    return out, q, k_cache, v_cache, meta


def _reference(q, k_cache, v_cache, meta, i):  # type: ignore[no-untyped-def]
    start, qlen = meta.prefill_query_starts[i], meta.prefill_query_lens[i]
    ctx = meta.prefill_context_lens[i]
    slots = meta.prefill_slots[i]
    keys = k_cache[slots].double().repeat_interleave(HEADS // KV_HEADS, dim=1)  # [ctx, H, D]
    values = v_cache[slots].double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q[start : start + qlen].double(), keys) * SCALE
    positions = torch.arange(ctx - qlen, ctx)[:, None]
    scores.masked_fill_(torch.arange(ctx)[None, :] > positions, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


def test_prefill_matches_a_float64_reference() -> None:
    # a fresh prompt, a chunk after 40 cached tokens, a one-token tail after 20
    out, q, k_cache, v_cache, meta = _run([24, 17, 1], [24, 57, 21])
    for i in range(3):
        start, qlen = meta.prefill_query_starts[i], meta.prefill_query_lens[i]
        expected = _reference(q, k_cache, v_cache, meta, i)
        assert torch.allclose(out[start : start + qlen].double(), expected, atol=2e-2), i


def test_a_prefill_is_the_same_alone_and_in_a_batch() -> None:
    batch, *_ = _run([24, 17, 30], [24, 57, 30])
    alone, *_ = _run([24], [24])
    assert torch.equal(batch[:24], alone[:24])


def test_the_fused_path_lists_every_prefill_row_for_the_decode_kernel() -> None:
    tables = [[3], [5, 6], [7, 8, 9, 10]]
    meta = build_attention_metadata(
        [1, 4, 3], [9, 20, 50], tables, BLOCK, rows_by_decode_kernel=True
    )
    assert meta.num_decodes == 1 and meta.prefill_query_starts == []  # no SDPA at all
    assert meta.prefill_rows is not None and meta.prefill_rows.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert meta.prefill_row_context_lens is not None
    assert meta.prefill_row_context_lens.tolist() == [17, 18, 19, 20, 48, 49, 50]
    assert meta.prefill_row_block_tables is not None
    assert meta.prefill_row_block_tables.tolist() == [[5, 6, 0, 0]] * 4 + [[7, 8, 9, 10]] * 3


def test_fused_prefill_rows_are_the_same_bits_however_the_prompt_is_chunked() -> None:
    kernels = load_cpu_kernels()
    if kernels is None:
        pytest.skip("no AVX-512 CPU kernels on this machine (the torch path runs instead)")
    _, q, k_cache, v_cache, _ = _run([57], [57])
    table = [list(range(8))]

    def rows(query_len: int, context_len: int) -> torch.Tensor:
        meta = build_attention_metadata(
            [query_len], [context_len], table, BLOCK, rows_by_decode_kernel=True
        )
        out = torch.empty(query_len, HEADS, DIM, dtype=torch.bfloat16)
        kernels.decode_attention(
            out,
            q[context_len - query_len : context_len],
            k_cache,
            v_cache,
            meta.prefill_row_block_tables,
            meta.prefill_row_context_lens,
            BLOCK,
            SCALE,
        )
        return out

    whole = rows(57, 57)
    chunked = torch.cat([rows(20, 20), rows(30, 50), rows(7, 57)])
    assert torch.equal(whole, chunked)
    meta = build_attention_metadata([57], [57], table, BLOCK)  # SDPA on the same rows: close
    assert torch.allclose(
        whole.float(), _reference(q, k_cache, v_cache, meta, 0).float(), atol=2e-2
    )
