"""Pre-packed (oneDNN) linear weights: the same logits, bit for bit, and no second weight copy."""

from __future__ import annotations

import pytest
import torch

from surge.models.layers import Linear, can_pack

from .paged_helpers import CASES, PagedRunner, load_pair, random_prompt

pytestmark = pytest.mark.skipif(
    not can_pack(torch.empty(1, dtype=torch.bfloat16)), reason="CPU without native bf16 matmul"
)


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_logits_equal_unpacked(case: str) -> None:
    _, model = load_pair(case, dtype=torch.bfloat16)
    prompt = random_prompt(21, seed=3)
    before = PagedRunner(model).greedy(0, prompt, 8), PagedRunner(model).step([(0, prompt)])[0]
    assert model.pack_weights() > 0
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight is None and m.packed_weight is not None for m in linears)
    after = PagedRunner(model).greedy(0, prompt, 8), PagedRunner(model).step([(0, prompt)])[0]
    assert after[0] == before[0]
    assert torch.equal(after[1], before[1])
