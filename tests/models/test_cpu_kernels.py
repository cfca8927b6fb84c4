"""The fused CPU kernels against plain torch references, and their batch invariance."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from surge.kernels import (
    AMX_BF16,
    AVX512_BF16,
    CpuKernels,
    build_library,
    cpu_flags,
    find_compiler,
    load_cpu_kernels,
    probe_amx,
)
from surge.models.layers import RMSNorm, apply_rotary

pytestmark = pytest.mark.skipif(
    load_cpu_kernels() is None, reason="no C++ compiler: kernels not built"
)


@pytest.fixture(scope="module", params=["native", "generic"])
def kernels(request) -> CpuKernels:
    """The library as the engine loads it, and its portable build (no AVX-512 intrinsics)."""
    if request.param == "native":
        return load_cpu_kernels()
    return CpuKernels(ctypes.CDLL(str(build_library(find_compiler(), ("-DSURGE_GENERIC",)))))


DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _paged_case(
    lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int, dtype, seed=0
):
    """Random caches holding len tokens per sequence in shuffled blocks; q [S, H, D]."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, pos = [], 0
    for nb in blocks_per_seq:
        tables.append(order[pos : pos + nb])
        pos += nb
    max_blocks = max(blocks_per_seq)
    table_t = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    for i, t in enumerate(tables):
        table_t[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    shape = (num_blocks * block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables, table_t, torch.tensor(lens, dtype=torch.int32)


def _reference_attention(q, k_cache, v_cache, tables, lens, block_size, scale):
    outs = []
    for i, n in enumerate(lens.tolist()):
        slots = torch.tensor(
            [tables[i][p // block_size] * block_size + p % block_size for p in range(n)]
        )
        k = k_cache[slots].float().transpose(0, 1)  # [Hkv, n, D]
        v = v_cache[slots].float().transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q[i].float()[:, None], k, v, scale=scale, enable_gqa=True
        )
        outs.append(o[:, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
def test_decode_attention_matches_reference(kernels, dtype, heads, kv_heads, head_dim):
    lens, block_size = [1, 5, 16, 17, 70, 200], 16
    q, kc, vc, tables, table_t, lens_t = _paged_case(
        lens, heads, kv_heads, head_dim, block_size, dtype
    )
    out = torch.empty_like(q)
    scale = head_dim**-0.5
    kernels.decode_attention(out, q, kc, vc, table_t, lens_t, block_size, scale)
    ref = _reference_attention(q, kc, vc, tables, lens_t, block_size, scale)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


def test_decode_attention_reads_strided_rows(kernels):
    """q may be the head slice of the fused qkv rows, not a contiguous tensor."""
    lens, block_size = [3, 40], 8
    q, kc, vc, tables, table_t, lens_t = _paged_case(lens, 4, 2, 32, block_size, torch.float32)
    qkv = torch.cat([q.flatten(1), torch.randn(2, 2 * 2 * 32)], dim=1)
    q_view = qkv[:, : 4 * 32].view(2, 4, 32)
    out = torch.empty_like(q)
    kernels.decode_attention(out, q_view, kc, vc, table_t, lens_t, block_size, 0.2)
    ref = _reference_attention(q, kc, vc, tables, lens_t, block_size, 0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_attention_is_batch_invariant(kernels):
    """A sequence's output is bit-identical alone and among others (bf16)."""
    lens, block_size = [37, 5, 130, 64], 16
    q, kc, vc, tables, table_t, lens_t = _paged_case(lens, 9, 3, 64, block_size, torch.bfloat16)
    together = torch.empty_like(q)
    kernels.decode_attention(together, q, kc, vc, table_t, lens_t, block_size, 0.125)
    for i in range(len(lens)):
        alone = torch.empty_like(q[i : i + 1])
        kernels.decode_attention(
            alone, q[i : i + 1], kc, vc, table_t[i : i + 1], lens_t[i : i + 1], block_size, 0.125
        )
        assert torch.equal(alone[0], together[i])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 576, 100])
def test_rms_norm_matches_module(kernels, dtype, dim):
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(dim, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(dim, generator=gen).to(dtype)
    x = torch.randn(13, dim, generator=gen).to(dtype)
    out = kernels.rms_norm(x, norm.weight, norm.eps)
    torch.testing.assert_close(out, norm(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_adds_the_residual_in_place(kernels, dtype):
    gen = torch.Generator().manual_seed(2)
    norm = RMSNorm(96).to(dtype)
    residual = torch.randn(20, 96, generator=gen).to(dtype)
    h = torch.randn(20, 96, generator=gen).to(dtype)
    expected_residual = residual + h
    out = kernels.rms_norm(h, norm.weight, norm.eps, residual=residual)
    assert torch.equal(residual, expected_residual)
    torch.testing.assert_close(out, norm(expected_residual), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved,rotary_dim", [(False, 64), (True, 64), (True, 32)])
def test_rope_and_cache_matches_reference(kernels, dtype, interleaved, rotary_dim):
    gen = torch.Generator().manual_seed(3)
    tokens, heads, kv_heads, head_dim = 7, 4, 2, 64
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(tokens, width, generator=gen).to(dtype)
    positions = torch.tensor([0, 1, 2, 9, 30, 31, 500])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    k_cache = torch.zeros(64, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([5, 6, 7, 40, 41, 0, 63])

    q_ref, k_ref, v_ref = qkv.float().split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1
    )
    q_ref = apply_rotary(
        q_ref.reshape(tokens, heads, head_dim), cos[:, None], sin[:, None], interleaved
    )
    k_ref = apply_rotary(
        k_ref.reshape(tokens, kv_heads, head_dim), cos[:, None], sin[:, None], interleaved
    )
    kernels.rope_and_cache(qkv, cos, sin, slots, k_cache, v_cache, heads, interleaved)
    tol = TOL[dtype]
    torch.testing.assert_close(qkv[:, : heads * head_dim].float(), q_ref.flatten(1), **tol)
    torch.testing.assert_close(k_cache[slots].float(), k_ref, **tol)
    torch.testing.assert_close(
        v_cache[slots].float(), v_ref.view(tokens, kv_heads, head_dim), **tol
    )
    assert k_cache[1:5].abs().sum() == 0  # untouched slots stay untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(kernels, dtype):
    gen = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(9, 2 * 48, generator=gen) * 6).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_and_mul(gate_up), F.silu(gate) * up, **TOL[dtype])


def test_unsupported_shapes_are_refused(kernels):
    assert kernels.supports(torch.bfloat16, 64)
    assert not kernels.supports(torch.float16, 64)
    assert not kernels.supports(torch.float32, 40)


@pytest.mark.parametrize("cols", [5, 16, 49152, 1000])
def test_argmax_matches_torch(kernels, cols):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(7, cols, generator=gen)
    logits[1] = 0.0  # all tied: the first index
    logits[2, cols // 2] = logits[2, -1] = 50.0  # a tie between a vector lane and the tail
    logits[3, -1] = 99.0  # in the tail
    logits[4, cols // 3] = float("nan")  # NaN wins, as in torch
    logits[5] = float("-inf")
    assert kernels.argmax(logits) == logits.argmax(dim=-1).tolist()


@functools.cache
def _native_library() -> Path:
    return build_library(find_compiler())


@functools.cache
def _amx_unavailable() -> str | None:
    """Why this machine can't run the AMX linear, or None."""
    if not {"amx_tile", "amx_bf16"} <= cpu_flags():
        return "the CPU has no AMX-BF16: the AMX path is checked on CPUs that have it"
    return probe_amx(_native_library())


@pytest.fixture(scope="module", params=[AVX512_BF16, AMX_BF16])
def linear_kernels(request) -> CpuKernels:
    """The native library with each bf16 linear implementation (one per process in the engine)."""
    lib = ctypes.CDLL(str(_native_library()))
    if not lib.surge_linear_bf16_supported():
        pytest.skip("this build has no bf16 linear kernel (needs AVX-512 BF16)")
    if request.param == AMX_BF16 and (reason := _amx_unavailable()) is not None:
        pytest.skip(reason)
    return CpuKernels(lib, linear_isa=request.param)


@pytest.mark.parametrize("rows", [1, 5, 12, 13, 16, 17, 32, 33, 64, 100])
@pytest.mark.parametrize(
    "n,k,bias", [(960, 576, False), (70, 64, True), (32, 1536, True), (40, 48, True)]
)
def test_linear_matches_float_reference(linear_kernels, rows, n, k, bias):
    kernels = linear_kernels
    gen = torch.Generator().manual_seed(rows * 7 + n)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) / k**0.5).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    got = kernels.linear(x, kernels.pack_linear(w), n, b)
    ref = x.float() @ w.float().T + (b.float() if bias else 0.0)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    # one float32 dot product rounded once: within bf16's half-ulp of the exact result
    torch.testing.assert_close(got.float(), ref, atol=1e-3, rtol=2**-8)
    # the same as torch's own bf16 linear up to that rounding
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-2, rtol=2**-7)
    # float32 out (logits): the unrounded sums, of which the bf16 out is the rounding
    exact = kernels.linear(x, kernels.pack_linear(w), n, b, out_dtype=torch.float32)
    assert exact.dtype == torch.float32
    torch.testing.assert_close(exact, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(exact.bfloat16(), got)


def test_linear_is_batch_invariant_and_takes_strided_rows(linear_kernels):
    kernels = linear_kernels
    gen = torch.Generator().manual_seed(11)
    wide = torch.randn(37, 3 * 128, generator=gen).bfloat16()
    x = wide[:, 128:256]  # rows 384 apart, as a slice of a fused projection
    w = torch.randn(200, 128, generator=gen).bfloat16()
    b = torch.randn(200, generator=gen).bfloat16()
    packed = kernels.pack_linear(w)
    batch = kernels.linear(x, packed, 200, b)
    for i in [0, 11, 12, 15, 16, 31, 32, 36]:  # first/last rows of either kernel's row groups
        assert torch.equal(kernels.linear(x[i : i + 1], packed, 200, b), batch[i : i + 1])
    assert torch.equal(kernels.linear(x[10:30], packed, 200, b), batch[10:30])
    assert torch.equal(kernels.linear(x.reshape(1, 37, 128), packed, 200, b)[0], batch)


def test_linear_refuses_what_it_cannot_take(kernels):
    assert not kernels.can_linear(torch.empty(8, 7, dtype=torch.bfloat16))  # odd K
    assert not kernels.can_linear(torch.empty(8, 8, dtype=torch.float32))
    assert kernels.can_linear(torch.empty(8, 8, dtype=torch.bfloat16)) == kernels.has_linear
    if kernels.has_linear:
        packed = kernels.pack_linear(torch.ones(8, 8, dtype=torch.bfloat16))
        with pytest.raises(TypeError, match="float32"):
            kernels.linear(torch.ones(2, 8), packed, 8, None)


def test_linear_isa_is_one_of_the_two_and_refuses_others():
    lib = ctypes.CDLL(str(_native_library()))
    assert load_cpu_kernels().linear_isa in (AMX_BF16, AVX512_BF16)
    with pytest.raises(ValueError, match="linear_isa"):
        CpuKernels(lib, linear_isa="sse2")


def test_amx_probe_reports_why_a_library_without_amx_is_refused():
    generic = build_library(find_compiler(), ("-DSURGE_GENERIC",))
    assert "not built with AMX" in probe_amx(generic)
    with pytest.raises(ValueError, match="not built with AMX"):
        CpuKernels(ctypes.CDLL(str(generic)), linear_isa=AMX_BF16)


def test_forced_avx512_skips_the_probe(monkeypatch):
    from surge.kernels import choose_linear_isa

    monkeypatch.setenv("SURGE_CPU_LINEAR", "avx512")
    lib = ctypes.CDLL(str(_native_library()))
    assert choose_linear_isa(_native_library(), lib) == AVX512_BF16
