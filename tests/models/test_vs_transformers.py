"""Each architecture against transformers on a tiny random config: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from .paged_helpers import BACKENDS, CASES, PagedRunner, load_pair, random_prompt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_prompt_logits_match_transformers(case: str, backend: str) -> None:
    hf, ours = load_pair(case, backend=backend)
    prompt = random_prompt(23, seed=0)
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    got = PagedRunner(ours).step([(0, prompt)])[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_decode_matches_generate(case: str, backend: str) -> None:
    hf, ours = load_pair(case, backend=backend)
    prompt, steps = random_prompt(7, seed=1), 40
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=steps,
            min_new_tokens=steps,  # eos must not stop HF early
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    # block_size 4: the prompt and the decodes span a dozen scattered blocks
    assert PagedRunner(ours, block_size=4).greedy(0, prompt, steps) == expected
