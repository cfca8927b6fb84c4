"""The batched sampler: greedy, filters, penalties, seeding and logprobs, on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from surge.engine.request import SamplingParams
from surge.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_k_top_p,
)

GREEDY = SamplingParams(temperature=0.0)
PROBS4 = [0.5, 0.3, 0.15, 0.05]


def _row(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
) -> SamplingRow:
    gen = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    return SamplingRow(params, prompt or [], output or [], gen)


def _logits(num_rows: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, vocab_size, generator=torch.Generator().manual_seed(seed)) * 3


def _draw(params: SamplingParams, logits_row: torch.Tensor, num_draws: int) -> list[int]:
    """`num_draws` independent draws of one row, as one batch of identical unseeded rows."""
    torch.manual_seed(1234)
    rows = [_row(params) for _ in range(num_draws)]
    return Sampler()(logits_row.expand(num_draws, -1).contiguous(), rows).token_ids


@pytest.mark.parametrize("num_rows", [1, 64])
def test_greedy_is_argmax(num_rows: int) -> None:
    logits = _logits(num_rows, 100)
    out = Sampler()(logits, [_row(GREEDY) for _ in range(num_rows)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * num_rows


def test_all_greedy_fast_path_skips_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("softmax on the all-greedy fast path")

    monkeypatch.setattr(torch.Tensor, "softmax", boom)
    monkeypatch.setattr(torch.Tensor, "log_softmax", boom)
    monkeypatch.setattr(torch.Tensor, "sort", boom)
    logits = _logits(8, 50)
    assert Sampler()(logits, [_row(GREEDY)] * 8).token_ids == logits.argmax(-1).tolist()


def test_greedy_row_unaffected_by_other_rows() -> None:
    logits = _logits(5, 200)
    others = [
        SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.3, repetition_penalty=1.5, presence_penalty=1.0),
        SamplingParams(temperature=0.0, frequency_penalty=2.0, logprobs=3),
        SamplingParams(temperature=1.0, seed=7),
    ]
    rows = [_row(GREEDY)] + [_row(p, prompt=[1, 2, 3], output=[4, 4]) for p in others]
    for _ in range(5):
        assert Sampler()(logits, rows).token_ids[0] == logits[0].argmax().item()


def test_temperature_matches_distribution() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    temperature = 0.7
    num_draws = 20_000
    tokens = _draw(SamplingParams(temperature=temperature), logits, num_draws)
    observed = torch.bincount(torch.tensor(tokens), minlength=6).double()
    expected = (logits / temperature).softmax(-1).double() * num_draws
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 30.0  # 5 degrees of freedom: p < 1e-5 to fail by chance


def test_seeded_row_matches_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    row = _row(SamplingParams(temperature=1.0, seed=3))
    sampler = Sampler()
    tokens = [sampler(logits, [row]).token_ids[0] for _ in range(4000)]
    observed = torch.bincount(torch.tensor(tokens), minlength=4).double()
    expected = logits[0].softmax(-1).double() * len(tokens)
    assert ((observed - expected) ** 2 / expected).sum().item() < 25.0


@pytest.mark.parametrize("num_rows", [1, 64])
def test_top_k_1_is_greedy(num_rows: int) -> None:
    logits = _logits(num_rows, 300, seed=1)
    rows = [_row(SamplingParams(temperature=1.5, top_k=1)) for _ in range(num_rows)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("num_rows", [1, 64])
def test_top_p_tiny_is_greedy(num_rows: int) -> None:
    logits = _logits(num_rows, 300, seed=2)
    rows = [_row(SamplingParams(temperature=1.5, top_p=1e-6)) for _ in range(num_rows)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_top_k_keeps_only_top_tokens() -> None:
    logits = _logits(1, 50, seed=3)[0]
    top = set(logits.topk(4).indices.tolist())
    tokens = _draw(SamplingParams(temperature=2.0, top_k=4), logits, 2000)
    assert set(tokens) == top


def test_top_p_keeps_nucleus() -> None:
    logits = torch.tensor(PROBS4).log()
    # Ascending cumulative probs are 0.05, 0.2, 0.5, 1.0: top_p 0.7 drops the two smallest.
    filtered = apply_top_k_top_p(logits[None], torch.tensor([4]), torch.tensor([0.7]))[0]
    assert torch.isinf(filtered[2:]).all() and torch.equal(filtered[:2], logits[:2])
    assert set(_draw(SamplingParams(top_p=0.7), logits, 2000)) == {0, 1}


def test_top_k_and_top_p_per_row() -> None:
    logits = torch.tensor(PROBS4).log().expand(3, -1)
    top_k = torch.tensor([2, 4, 4])
    top_p = torch.tensor([1.0, 0.7, 1.0])
    kept = torch.isfinite(apply_top_k_top_p(logits, top_k, top_p))
    assert kept.tolist() == [[True, True, False, False]] * 2 + [[True] * 4]


def test_top_k_alone_matches_sort_path() -> None:
    logits = _logits(4, 300, seed=7)
    top_k = [1, 5, 37, 299]
    via_sort = apply_top_k_top_p(logits, torch.tensor(top_k), torch.ones(4))
    assert torch.equal(apply_top_k(logits, top_k), via_sort)
    assert torch.isfinite(via_sort).sum(-1).tolist() == top_k


def test_min_p_filters() -> None:
    logits = torch.tensor(PROBS4).log()
    # Threshold 0.2 * 0.5 = 0.1: only the 0.05 token goes.
    kept = torch.isfinite(apply_min_p(logits[None], torch.tensor([0.2])))[0]
    assert kept.tolist() == [True, True, True, False]
    assert torch.isfinite(apply_min_p(logits[None], torch.tensor([0.0]))).all()
    assert set(_draw(SamplingParams(min_p=0.2), logits, 3000)) == {0, 1, 2}


RAW = [2.0, -1.0, 0.5, -0.5, 1.0, 0.0]
PROMPT, OUTPUT = [0, 1], [2, 2, 3]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # Tokens 0-3 seen in prompt+output: positive logits halved, negative doubled.
        (SamplingParams(repetition_penalty=2.0), [1.0, -2.0, 0.25, -1.0, 1.0, 0.0]),
        # Output tokens 2 and 3 present: each minus 0.5; prompt tokens untouched.
        (SamplingParams(presence_penalty=0.5), [2.0, -1.0, 0.0, -1.0, 1.0, 0.0]),
        # Output counts 2 -> 2 and 3 -> 1, times 0.25.
        (SamplingParams(frequency_penalty=0.25), [2.0, -1.0, 0.0, -0.75, 1.0, 0.0]),
        (
            SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
            [1.0, -2.0, 0.25 - 0.5 - 0.5, -1.0 - 0.5 - 0.25, 1.0, 0.0],
        ),
    ],
)
def test_penalties_exact_values(params: SamplingParams, expected: list[float]) -> None:
    logits = torch.tensor([RAW, RAW])
    rows = [_row(params, PROMPT, OUTPUT), _row(SamplingParams(), PROMPT, OUTPUT)]
    out = apply_penalties(logits, rows)
    assert out[0].tolist() == pytest.approx(expected)
    assert out[1].tolist() == RAW  # a row without penalties is untouched
    assert logits[0].tolist() == RAW  # the caller's logits are never written


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    assert Sampler()(logits, [_row(GREEDY, output=[0])]).token_ids == [0]
    penalized = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert Sampler()(logits, [_row(penalized, output=[0])]).token_ids == [1]
    presence = SamplingParams(temperature=0.0, presence_penalty=0.2)
    assert Sampler()(logits, [_row(presence, prompt=[0])]).token_ids == [0]  # output only


def _run_steps(rows: list[SamplingRow], target: int, num_steps: int) -> list[int]:
    sampler = Sampler()
    step_logits = _logits(num_steps, 1000, seed=42)
    tokens = []
    for step in range(num_steps):
        logits = _logits(len(rows), 1000, seed=100 + step)
        logits[target] = step_logits[step]
        tokens.append(sampler(logits, rows).token_ids[target])
    return tokens


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.9, top_k=200, top_p=0.95, seed=11),
        # Alone this row takes the top-k-only path; in the batch below, the full-sort path.
        SamplingParams(temperature=0.9, top_k=50, seed=12),
        SamplingParams(temperature=1.1, repetition_penalty=1.3, min_p=0.01, seed=13),
    ],
)
def test_seeded_row_independent_of_batch(params: SamplingParams) -> None:
    alone = _run_steps([_row(params)], target=0, num_steps=6)
    torch.manual_seed(999)  # the unseeded rows' global RNG must not matter
    batch = [
        _row(SamplingParams(temperature=1.0)),
        _row(SamplingParams(temperature=0.5, seed=5, min_p=0.1)),
        _row(GREEDY),
        _row(params),
        _row(SamplingParams(temperature=1.2, top_k=3, top_p=0.8, logprobs=2)),
    ]
    assert _run_steps(batch, target=3, num_steps=6) == alone


def test_same_seed_same_sequence_different_seed_differs() -> None:
    def run(seed: int) -> list[int]:
        return _run_steps([_row(SamplingParams(temperature=1.0, seed=seed))], 0, num_steps=20)

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("num_rows", [1, 64])
def test_logprobs_from_raw_distribution(num_rows: int) -> None:
    logits = _logits(num_rows, 500, seed=4)
    params = SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.3, logprobs=5)
    rows = [_row(params, prompt=[1, 2], output=[3]) for _ in range(num_rows)]
    out = Sampler()(logits, rows)
    raw = logits.log_softmax(-1)
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert lp is not None
        sampled, top = lp
        assert sampled == pytest.approx(raw[i, token].item(), abs=1e-5)
        assert len(top) == 5
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in top] == raw[i].topk(5).indices.tolist()
        assert values == pytest.approx(raw[i].topk(5).values.tolist(), abs=1e-5)


def test_logprobs_zero_and_none_per_row() -> None:
    logits = _logits(3, 100, seed=5)
    rows = [
        _row(SamplingParams(temperature=0.0, logprobs=0)),
        _row(SamplingParams(temperature=1.0)),
        _row(SamplingParams(temperature=1.0, logprobs=3)),
    ]
    out = Sampler()(logits, rows)
    assert out.logprobs[0] is not None and out.logprobs[0][1] == []
    assert out.logprobs[0][0] == pytest.approx(logits[0].log_softmax(-1).max().item(), abs=1e-5)
    assert out.logprobs[1] is None
    assert out.logprobs[2] is not None and len(out.logprobs[2][1]) == 3


def test_mixed_batch_of_64_is_valid_and_leaves_logits_intact() -> None:
    logits = _logits(64, 300, seed=6)
    before = logits.clone()
    kinds = [
        GREEDY,
        SamplingParams(temperature=0.8, top_k=10),
        SamplingParams(temperature=1.0, top_p=0.5, min_p=0.05, seed=3),
        SamplingParams(temperature=1.1, frequency_penalty=1.0, logprobs=1),
    ]
    rows = [_row(kinds[i % 4], prompt=[i], output=[i + 1, i + 1]) for i in range(64)]
    out = Sampler()(logits, rows)
    assert len(out.token_ids) == 64 and all(0 <= t < 300 for t in out.token_ids)
    assert torch.equal(logits, before)
    for i in range(1, 64, 4):  # top_k=10 rows stay in their top 10
        assert out.token_ids[i] in logits[i].topk(10).indices.tolist()


def test_masked_vocab_is_never_sampled() -> None:
    logits = torch.full((16, 50), -math.inf)
    logits[:, 7] = 0.0
    logits[:, 9] = 0.5
    rows = [_row(SamplingParams(temperature=1.0, seed=i if i % 2 else None)) for i in range(16)]
    assert set(Sampler()(logits, rows).token_ids) <= {7, 9}


def test_row_count_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        Sampler()(_logits(2, 10), [_row(GREEDY)])


def test_top_p_over_candidates_equals_full_sort() -> None:
    """Large vocabulary: peaked rows use the top-candidates path, flat rows fall back; same mask."""
    from surge.engine.sampler import _top_k_top_p_candidates

    g = torch.Generator().manual_seed(5)
    vocab = 8192
    peaked = torch.randn(3, vocab, generator=g) * 8.0  # nucleus within the top 512
    flat = torch.randn(2, vocab, generator=g) * 0.1  # nucleus far wider than 512 tokens
    logits = torch.cat([peaked, flat])
    top_k = [vocab, 40, vocab, vocab, 1000]
    top_p = [0.9, 0.8, 0.5, 0.9, 0.95]
    got = _top_k_top_p_candidates(logits, top_k, top_p)
    want = apply_top_k_top_p(logits, torch.tensor(top_k), torch.tensor(top_p))
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    kept = torch.isfinite(want)
    assert torch.equal(got[kept], want[kept])
    assert int(kept[3].sum()) > 512  # the flat row really needed the fall-back
