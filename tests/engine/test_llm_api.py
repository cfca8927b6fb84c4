"""The offline API end to end on a tiny model: sampling options, n, stop, logprobs, errors, abort."""

from __future__ import annotations

from pathlib import Path

import pytest

from surge import LLM, InvalidRequestError, SamplingParams
from surge.engine.messages import EngineCoreRequest


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> LLM:
    return LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=64)


def test_generate_text_prompt_and_finish_reasons(llm: LLM) -> None:
    out = llm.generate(
        "The quick brown fox", SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    )[0]
    assert out.finished and out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 5
    assert out.outputs[0].text == llm.get_tokenizer().decode(out.outputs[0].token_ids)


def test_stop_token_ids_and_eos(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ids = llm.generate("Paris is", greedy)[0].outputs[0].token_ids
    stop_at = ids[3]
    out = llm.generate(
        "Paris is", SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stop_at])
    )[0]
    first = ids.index(stop_at)
    assert out.outputs[0].token_ids == ids[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_at


def test_stop_string_truncates_text(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = llm.generate("Many users", greedy)[0].outputs[0].text
    assert len(full) > 6
    stop = full[3:5]
    out = llm.generate(
        "Many users", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop])
    )[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible_and_n(llm: LLM) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=7, ignore_eos=True)
    a = llm.generate("The quick", p)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    batch = llm.generate(["The quick", "def add", "Paris"], [p, noise, noise])
    assert batch[0].outputs[0].token_ids == a
    many = llm.generate(
        "The quick",
        SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=10, seed=7, ignore_eos=True),
    )[0]
    assert [c.index for c in many.outputs] == [0, 1, 2]
    assert many.outputs[0].token_ids == a
    assert len({tuple(c.token_ids) for c in many.outputs}) > 1


def test_logprobs(llm: LLM) -> None:
    out = llm.generate(
        "Paris", SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True)
    )[0]
    c = out.outputs[0]
    assert c.logprobs is not None and len(c.logprobs) == 4
    for token_id, entry in zip(c.token_ids, c.logprobs, strict=True):
        assert token_id in entry and 3 <= len(entry) <= 4
        assert entry[token_id] == max(entry.values())  # greedy picks the most likely token
    assert c.cumulative_logprob == pytest.approx(
        sum(e[t] for t, e in zip(c.token_ids, c.logprobs, strict=True))
    )


def test_bad_input_raises_and_engine_keeps_serving(llm: LLM) -> None:
    limit = llm.engine.limits.max_model_len
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[5] * (limit + 1)], SamplingParams(max_tokens=1))
    assert str(limit) in str(e.value)
    with pytest.raises(InvalidRequestError):
        llm.generate([[5] * 10], SamplingParams(max_tokens=10_000))
    with pytest.raises(InvalidRequestError):
        SamplingParams(max_tokens=-1)
    with pytest.raises(InvalidRequestError):
        llm.generate([[]], SamplingParams(max_tokens=1))
    out = llm.generate("Paris", SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3


def test_out_of_vocab_token_finishes_that_request_with_error(llm: LLM) -> None:
    engine = llm.engine
    vocab = engine.core.runner.vocab_size
    with pytest.raises(InvalidRequestError):  # the front end refuses it before the core
        engine.add_request("bad", [vocab + 5], SamplingParams(max_tokens=2))
    # and should one get past a front end, the core fails that request alone
    engine.core.add_request(
        EngineCoreRequest("bad", [vocab + 5], SamplingParams(max_tokens=2), 0.0)
    )
    errors = engine.core.step().outputs
    assert [(o.req_id, o.finish_reason) for o in errors] == [("bad", "error")] and errors[0].error
    engine.add_request(
        "good", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    )
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.req_id] = out
    assert len(done["good"].outputs[0].token_ids) == 2


def test_abort_frees_blocks_at_once(llm: LLM) -> None:
    engine = llm.engine
    sched = engine.core.scheduler
    for i in range(4):
        engine.add_request(
            f"a{i}", list(range(5, 60)), SamplingParams(max_tokens=100, ignore_eos=True)
        )
    engine.step()
    engine.step()
    assert sched.kv_cache_usage > 0
    for i in range(4):
        engine.abort_request(f"a{i}")
    assert sched.kv_cache_usage == 0.0
    assert not engine.has_unfinished_requests()


def test_chat_uses_template(llm: LLM) -> None:
    out = llm.chat(
        [{"role": "user", "content": "hi"}],
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
    )[0]
    tok = llm.get_tokenizer()
    assert tok.decode(out.prompt_token_ids, skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n"
    )


def test_metrics_timestamps_are_ordered(llm: LLM) -> None:
    out = llm.generate("Paris", SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    m = out.metrics
    assert m is not None and m.first_scheduled_time is not None
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
