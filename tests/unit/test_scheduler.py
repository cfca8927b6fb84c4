"""Scheduler driven by hand with fake token ids: budgets, chunking, prefix hits, preemption."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from surge.config import EngineConfig, EngineLimits
from surge.engine.request import InvalidRequestError, Request, RequestStatus, SamplingParams
from surge.engine.scheduler import Scheduler, SchedulerOutput

BS = 4
EOS = 2
_prompt_ids = itertools.count(1)


def create_scheduler(
    num_blocks: int = 64,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    chunked: bool = True,
    prefix: bool = True,
    max_model_len: int = 1024,
) -> Scheduler:
    config = EngineConfig(
        block_size=BS,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=prefix,
    )
    return Scheduler(config, EngineLimits(num_blocks, BS, max_model_len, (EOS,)))


def create_request(
    req_id: str,
    num_prompt_tokens: int = 10,
    max_tokens: int | None = 4,
    priority: int = 0,
    prompt: list[int] | None = None,
    **params: object,
) -> Request:
    if prompt is None:  # distinct per request (no accidental prefix hits), never EOS or 5
        base = 1000 * next(_prompt_ids)
        prompt = [base + i for i in range(num_prompt_tokens)]
    sampling = SamplingParams(max_tokens=max_tokens, **params)  # type: ignore[arg-type]
    return Request(req_id, prompt, sampling, priority=priority)


def sample_all(out: SchedulerOutput, token: int = 5) -> dict[str, int]:
    return {s.request.req_id: token for s in out.seqs if s.sample}


def step(sched: Scheduler, token: int = 5) -> SchedulerOutput:
    out = sched.schedule()
    sched.update_from_output(out, sample_all(out, token))
    return out


def run_to_completion(sched: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished_requests():
        outs.append(step(sched))
        assert len(outs) < max_steps, "scheduler made no progress"
    return outs


def check_scheduler_invariants(sched: Scheduler) -> None:
    kv = sched.kv
    holders = Counter(i for r in sched.running for i in kv.get_block_ids(r))
    for block in kv.block_pool.blocks:
        assert block.ref_cnt == holders[block.block_id] >= 0
    free = [b.block_id for b in kv.block_pool.free_queue]
    assert len(free) == len(set(free)) == kv.num_free_blocks
    assert kv.num_free_blocks + len(holders) == kv.num_blocks
    for req_id in sched.waiting:
        assert kv.get_block_ids(req_id) == []
    for req in sched.running.values():
        assert req.status == RequestStatus.RUNNING
        assert len(kv.get_block_ids(req.req_id)) * BS >= req.num_computed_tokens
    assert sched.num_running <= sched.config.max_num_seqs


def test_token_budget_and_seq_cap() -> None:
    sched = create_scheduler(max_num_seqs=3, max_num_batched_tokens=16)
    for i in range(5):
        sched.add_request(create_request(f"r{i}", num_prompt_tokens=10))
    out = sched.schedule()
    assert out.num_batched_tokens <= 16 and len(out.seqs) <= 3
    assert [s.num_new_tokens for s in out.seqs] == [10, 6]  # second prompt chunked
    sched.update_from_output(out, sample_all(out))
    while sched.has_unfinished_requests():
        out = step(sched)
        assert out.num_batched_tokens <= 16 and len(out.seqs) <= 3
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.seqs)
        assert sched.num_running <= 3


def test_chunked_prefill_covers_prompt_exactly() -> None:
    sched = create_scheduler(max_num_batched_tokens=8)
    req = create_request("long", num_prompt_tokens=21, max_tokens=2)
    sched.add_request(req)
    chunks = []
    for _ in range(3):
        out = step(sched)
        (seq,) = out.seqs
        chunks.append((seq.num_computed_tokens, seq.num_new_tokens, seq.sample))
    assert chunks == [(0, 8, False), (8, 8, False), (16, 5, True)]
    assert req.output_token_ids == [5]
    out = step(sched)
    assert (out.seqs[0].num_computed_tokens, out.seqs[0].num_new_tokens) == (21, 1)
    assert req.status == RequestStatus.FINISHED_LENGTH and req.num_output_tokens == 2


def test_without_chunking_prompts_run_whole_or_wait() -> None:
    sched = create_scheduler(max_num_batched_tokens=16, chunked=False)
    sched.add_request(create_request("a", num_prompt_tokens=10))
    sched.add_request(create_request("b", num_prompt_tokens=10))
    out = step(sched)
    assert [(s.request.req_id, s.num_new_tokens) for s in out.seqs] == [("a", 10)]
    out = step(sched)
    assert [(s.request.req_id, s.num_new_tokens) for s in out.seqs] == [("a", 1), ("b", 10)]


def test_without_chunking_a_prompt_over_the_budget_runs_alone() -> None:
    sched = create_scheduler(max_num_batched_tokens=8, chunked=False)
    sched.add_request(create_request("huge", num_prompt_tokens=20, max_tokens=2))
    sched.add_request(create_request("small", num_prompt_tokens=3, max_tokens=2))
    out = step(sched)
    assert [(s.request.req_id, s.num_new_tokens) for s in out.seqs] == [("huge", 20)]
    out = step(sched)
    assert [(s.request.req_id, s.num_new_tokens) for s in out.seqs] == [("huge", 1), ("small", 3)]
    run_to_completion(sched)


def test_decodes_come_first() -> None:
    sched = create_scheduler(max_num_batched_tokens=64)
    sched.add_request(create_request("a", num_prompt_tokens=6, max_tokens=8))
    step(sched)
    sched.add_request(create_request("b", num_prompt_tokens=7))
    sched.add_request(create_request("c", num_prompt_tokens=1))  # a 1-token prefill
    out = sched.schedule()
    assert [(s.request.req_id, s.num_new_tokens) for s in out.seqs] == [
        ("a", 1),
        ("c", 1),
        ("b", 7),
    ]
    assert all(s.sample for s in out.seqs)


def test_prefix_hit_between_requests() -> None:
    sched = create_scheduler()
    shared = [100 + i for i in range(3 * BS)]
    a = create_request("a", prompt=shared + [7, 8], max_tokens=1)
    b = create_request("b", prompt=shared + [9], max_tokens=1)
    sched.add_request(a)
    step(sched)
    sched.add_request(b)
    out = sched.schedule()
    (seq,) = out.seqs
    assert seq.num_computed_tokens == 3 * BS and seq.num_new_tokens == 1
    assert b.num_cached_tokens == 3 * BS
    assert sched.prefix_cache_hits == 3 * BS
    same = create_request("same", prompt=list(shared), max_tokens=1)
    sched.add_request(same)  # whole prompt cached: the last block is still computed
    out = sched.schedule()
    assert out.seqs[-1].num_computed_tokens == 2 * BS


def test_same_step_prefix_sharing() -> None:
    sched = create_scheduler()
    shared = [100 + i for i in range(2 * BS)]
    sched.add_request(create_request("a", prompt=shared + [1], max_tokens=1))
    sched.add_request(create_request("b", prompt=shared + [3], max_tokens=1))
    out = sched.schedule()
    # b reuses the blocks a fills in this very step (and, with one new token, comes first)
    got = {s.request.req_id: (s.num_computed_tokens, s.num_new_tokens) for s in out.seqs}
    assert got == {"a": (0, 2 * BS + 1), "b": (2 * BS, 1)}
    assert out.seqs[1].block_ids[:2] == out.seqs[0].block_ids[:2]


def test_preemption_on_a_tiny_pool() -> None:
    sched = create_scheduler(num_blocks=6, max_num_batched_tokens=64)
    reqs = [create_request(f"r{i}", num_prompt_tokens=7, max_tokens=10) for i in range(3)]
    for req in reqs:
        sched.add_request(req)
    preempted: list[str] = []
    for out in run_to_completion(sched):
        preempted += out.preempted_req_ids
        check_scheduler_invariants(sched)
    assert preempted and preempted[0] == "r2"  # newest of equal priority goes first
    assert sched.num_preemptions_total == len(preempted)
    for req in reqs:
        assert req.status == RequestStatus.FINISHED_LENGTH and req.output_token_ids == [5] * 10
    assert reqs[2].num_preemptions >= 1
    assert sched.kv.num_free_blocks == 6


def test_preemption_victim_is_lowest_priority() -> None:
    sched = create_scheduler(num_blocks=6, max_num_batched_tokens=64)
    low = create_request("low", num_prompt_tokens=7, max_tokens=10, priority=5)
    high = create_request("high", num_prompt_tokens=7, max_tokens=10, priority=0)
    mid = create_request("mid", num_prompt_tokens=7, max_tokens=10, priority=1)
    for req in (low, high, mid):
        sched.add_request(req)
    first = []
    for out in run_to_completion(sched):
        first += out.preempted_req_ids
    assert first[0] == "low"
    assert high.num_preemptions == 0
    assert all(r.num_output_tokens == 10 for r in (low, high, mid))


def test_preempted_request_recovers_cached_blocks() -> None:
    sched = create_scheduler(num_blocks=8, max_num_batched_tokens=64)
    a = create_request("a", num_prompt_tokens=12, max_tokens=10)
    b = create_request("b", num_prompt_tokens=12, max_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    resumed = None
    for _ in range(60):
        out = step(sched)
        for seq in out.seqs:
            if seq.request is b and b.num_preemptions and resumed is None:
                resumed = seq.num_computed_tokens
        if not sched.has_unfinished_requests():
            break
    assert b.num_preemptions >= 1
    assert resumed is not None and resumed > 0  # its prompt blocks were still cached
    assert a.num_output_tokens == 10 and b.num_output_tokens == 20
    assert b.output_token_ids == [5] * 20


def test_waiting_request_with_higher_priority_preempts() -> None:
    sched = create_scheduler(num_blocks=6, max_num_batched_tokens=64)
    low = create_request("low", num_prompt_tokens=20, max_tokens=3, priority=3)
    sched.add_request(low)
    step(sched)
    high = create_request("high", num_prompt_tokens=8, max_tokens=2, priority=0)
    sched.add_request(high)
    out = step(sched)
    assert out.preempted_req_ids == ["low"]
    assert [s.request.req_id for s in out.seqs] == ["high"]
    run_to_completion(sched)
    assert high.num_output_tokens == 2 and low.num_output_tokens == 3


def test_abort_frees_blocks() -> None:
    sched = create_scheduler(num_blocks=16, max_num_batched_tokens=16)
    for i in range(4):
        sched.add_request(create_request(f"r{i}", num_prompt_tokens=10, max_tokens=100))
    step(sched)
    assert sched.num_running == 2 and sched.num_waiting == 2
    aborted = sched.abort_requests(["r0", "r3", "nope"])
    assert [r.req_id for r in aborted] == ["r0", "r3"]
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in aborted)
    assert sched.schedule().finished_req_ids == ["r0", "r3"]
    sched.abort_requests(["r1", "r2"])
    assert sched.kv.num_free_blocks == 16 and not sched.has_unfinished_requests()
    assert sched.schedule().seqs == []


def test_abort_between_schedule_and_update() -> None:
    sched = create_scheduler()
    req = create_request("a")
    sched.add_request(req)
    out = sched.schedule()
    sched.abort_requests(["a"])
    assert sched.update_from_output(out, sample_all(out)) == []
    assert req.output_token_ids == [] and sched.kv.num_free_blocks == 64


def test_finish_requests_with_error() -> None:
    sched = create_scheduler()
    sched.add_request(create_request("a"))
    step(sched)
    (req,) = sched.finish_requests(["a"], RequestStatus.FINISHED_ERROR, error="boom")
    assert req.finish_reason == "error" and req.error == "boom"
    assert sched.kv.num_free_blocks == 64


@pytest.mark.parametrize(
    ("params", "limit", "tokens", "status", "n_out"),
    [
        ({}, 1024, [5, EOS, 5], RequestStatus.FINISHED_STOPPED, 2),
        ({"stop_token_ids": [7]}, 1024, [5, 7, 5], RequestStatus.FINISHED_STOPPED, 2),
        ({"ignore_eos": True}, 1024, [EOS] * 5, RequestStatus.FINISHED_LENGTH, 4),
        ({}, 1024, [5] * 5, RequestStatus.FINISHED_LENGTH, 4),
        ({"max_tokens": None}, 13, [5] * 5, RequestStatus.FINISHED_LENGTH, 3),
    ],
)
def test_finish_reasons(
    params: dict[str, object], limit: int, tokens: list[int], status: RequestStatus, n_out: int
) -> None:
    sched = create_scheduler(max_model_len=limit)
    params = {"max_tokens": 4, **params}
    req = create_request("a", num_prompt_tokens=10, **params)  # type: ignore[arg-type]
    sched.add_request(req)
    for token in tokens:
        if not sched.has_unfinished_requests():
            break
        step(sched, token)
    assert req.status == status and req.num_output_tokens == n_out
    assert sched.kv.num_free_blocks == 64


def test_prompt_over_the_limit_is_rejected() -> None:
    sched = create_scheduler(max_model_len=16)
    with pytest.raises(InvalidRequestError):
        sched.add_request(create_request("a", num_prompt_tokens=17))
    small_kv = create_scheduler(num_blocks=2)
    with pytest.raises(InvalidRequestError):
        small_kv.add_request(create_request("b", num_prompt_tokens=9))


def test_priority_then_arrival_order() -> None:
    sched = create_scheduler(max_num_seqs=1)
    for req_id, prio in [("late-low", 2), ("first-mid", 1), ("high", 0), ("second-mid", 1)]:
        sched.add_request(create_request(req_id, max_tokens=1, priority=prio))
    order = [out.seqs[0].request.req_id for out in run_to_completion(sched)]
    assert order == ["high", "first-mid", "second-mid", "late-low"]


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 8), st.integers(0, 2)),
        st.tuples(st.just("step"), st.integers(0, 3)),
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("abort_mid_step"), st.integers(0, 30)),
    ),
    max_size=60,
)


@settings(max_examples=80, deadline=None)
@given(ops=OPS, chunked=st.booleans(), prefix=st.booleans())
def test_random_traffic_keeps_invariants(ops: list[tuple], chunked: bool, prefix: bool) -> None:
    sched = create_scheduler(
        num_blocks=12, max_num_seqs=4, max_num_batched_tokens=16, chunked=chunked, prefix=prefix
    )
    reqs: list[Request] = []
    for op in ops:
        if op[0] == "add":
            _, n, max_tokens, prio = op
            prompt = [10 + (i % 3) for i in range(n)]  # repetitive: lots of prefix sharing
            reqs.append(create_request(f"r{len(reqs)}", prompt=prompt, max_tokens=max_tokens))
            reqs[-1].priority = prio
            sched.add_request(reqs[-1])
        elif op[0] == "step":
            out = step(sched, token=op[1] + 3)
            assert out.num_batched_tokens <= 16 or len(out.seqs) == 1
            assert len(out.seqs) <= 4
            assert len({s.request.req_id for s in out.seqs}) == len(out.seqs)
        elif op[0] == "abort_mid_step" and reqs:
            out = sched.schedule()  # the runner ran, then the client went away
            sched.abort_requests([reqs[op[1] % len(reqs)].req_id])
            sched.update_from_output(out, sample_all(out))
        elif reqs:
            sched.abort_requests([reqs[op[1] % len(reqs)].req_id])
        check_scheduler_invariants(sched)
    run_to_completion(sched)
    assert sched.kv.num_free_blocks == 12
    assert all(b.ref_cnt == 0 for b in sched.kv.block_pool.blocks)
    for req in reqs:
        assert req.is_finished
        if req.status != RequestStatus.FINISHED_ABORTED:
            assert req.num_output_tokens == req.sampling_params.max_tokens
