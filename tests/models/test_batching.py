"""A mixed flat batch equals each sequence alone; bfloat16 stays close to float32."""

from __future__ import annotations

import pytest
import torch

from surge.kernels import load_cpu_kernels
from surge.models.layers import Linear
from surge.models.registry import create_model

from .paged_helpers import BACKENDS, PagedRunner, load_pair, random_prompt, use_backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["llama", "qwen3", "glm4"])
def test_mixed_batch_matches_sequences_alone(case: str, backend: str) -> None:
    _, model = load_pair(case, backend=backend)
    seqs = {i: random_prompt(n, seed=10 + i) for i, n in enumerate([10, 6, 13, 9])}
    runner = PagedRunner(model, block_size=4)
    # earlier steps: seqs 0 and 1 prefilled but their last token not yet run; seq 2's first chunk
    runner.step([(0, seqs[0][:-1]), (1, seqs[1][:-1]), (2, seqs[2][:7])])
    # one step: 2 decodes, a chunk continuing from cached context, a fresh prefill
    got = runner.step([(0, seqs[0][-1:]), (1, seqs[1][-1:]), (2, seqs[2][7:]), (3, seqs[3])])
    for (seq_id, tokens), logits in zip(seqs.items(), got, strict=True):
        alone = PagedRunner(model, block_size=4).step([(seq_id, tokens)])[0]
        torch.testing.assert_close(logits, alone[-len(logits) :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_prefix_blocks_filled_in_the_same_step(backend: str) -> None:
    # a prefix-cache hit on blocks another sequence writes in this very step
    _, model = load_pair("llama", backend=backend)
    prompt = random_prompt(12, seed=3)
    runner = PagedRunner(model, block_size=4)
    runner.tables[1] = runner.tables.setdefault(0, [runner.free.pop(), runner.free.pop()])[:]
    runner.num_tokens[1] = 8  # seq 1 reuses seq 0's first two blocks without computing them
    first, second = runner.step([(0, prompt), (1, prompt[8:])])
    torch.testing.assert_close(second, first[8:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["llama", "glm4"])
def test_bfloat16_close_to_float32(case: str, backend: str) -> None:
    hf, fp32 = load_pair(case)
    bf16 = create_model(hf.config, torch.bfloat16, "cpu")
    bf16.load_weights(hf.state_dict().items())
    use_backend(bf16, backend)
    kernels = load_cpu_kernels()
    if backend == "kernels" and kernels.has_linear:  # the kernels' own bf16 linear is under test
        assert all(m.kernel_weight is not None for m in bf16.modules() if isinstance(m, Linear))
    prompt = random_prompt(20, seed=4)
    expected = PagedRunner(fp32).step([(0, prompt)])[0]
    got = PagedRunner(bf16).step([(0, prompt)])[0]
    assert got.dtype == torch.float32
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 0.05 * scale
