"""The OpenAI surface on the tiny model: shapes, streaming contract, n, logprobs, bad input."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.utils import RemoteSurgeServer, parse_stream, sse_events

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


def stream(
    server: RemoteSurgeServer, path: str, body: dict, headers: dict | None = None
) -> list[str]:
    with httpx.stream("POST", server.url(path), json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r.iter_lines()))


def test_models_and_chat(tiny_server: RemoteSurgeServer) -> None:
    client = tiny_server.client()
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_server_model(tiny_server)]
    resp = client.chat.completions.create(
        model=models[0].id, messages=MESSAGES, max_tokens=5, temperature=0
    )
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason in {"stop", "length"}
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens <= 5
    again = client.chat.completions.create(
        model=models[0].id, messages=MESSAGES, max_tokens=5, temperature=0
    )
    assert again.choices[0].message.content == resp.choices[0].message.content


def tiny_server_model(server: RemoteSurgeServer) -> str:
    return httpx.get(server.url("/v1/models")).json()["data"][0]["id"]


def test_content_parts_and_completions(tiny_server: RemoteSurgeServer) -> None:
    client = tiny_server.client()
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}],
        }
    ]
    a = client.chat.completions.create(
        model=tiny_server_model(tiny_server), messages=parts, max_tokens=4, temperature=0
    )
    b = client.chat.completions.create(
        model=tiny_server_model(tiny_server),
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        temperature=0,
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    c = client.completions.create(
        model=tiny_server_model(tiny_server),
        prompt="The quick",
        max_tokens=6,
        temperature=0,
        echo=True,
    )
    assert c.object == "text_completion" and c.choices[0].text.startswith("The quick")
    ids = httpx.post(tiny_server.url("/tokenize"), json={"prompt": "The quick"}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 512
    assert (
        httpx.post(tiny_server.url("/detokenize"), json={"tokens": ids["tokens"]}).json()["prompt"]
        == "The quick"
    )
    by_ids = client.completions.create(
        model=tiny_server_model(tiny_server), prompt=ids["tokens"], max_tokens=6, temperature=0
    )
    assert "The quick" + by_ids.choices[0].text == c.choices[0].text


def test_stream_final_chunk_usage_done(tiny_server: RemoteSurgeServer) -> None:
    body = {
        "messages": MESSAGES,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks, _ = parse_stream(stream(tiny_server, "/v1/chat/completions", body))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
    assert all(c["choices"][0]["finish_reason"] is None for c in with_choices[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 6
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in with_choices)
    plain = tiny_server.client().chat.completions.create(
        model=tiny_server_model(tiny_server), messages=MESSAGES, max_tokens=6, temperature=0
    )
    assert text == plain.choices[0].message.content
    assert chunks[-1]["usage"]["completion_tokens"] == plain.usage.completion_tokens


def test_stream_with_openai_client_n2(tiny_server: RemoteSurgeServer) -> None:
    client = tiny_server.client()
    texts, finished = {0: "", 1: ""}, set()
    for chunk in client.chat.completions.create(
        model=tiny_server_model(tiny_server),
        messages=MESSAGES,
        max_tokens=8,
        n=2,
        temperature=1.0,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
        if chunk.usage is not None:
            usage = chunk.usage
    assert finished == {0, 1}
    assert usage.completion_tokens <= 16
    full = client.chat.completions.create(
        model=tiny_server_model(tiny_server),
        messages=MESSAGES,
        max_tokens=8,
        n=2,
        temperature=1.0,
        seed=3,
    )
    assert {c.index: c.message.content for c in full.choices} == texts


def test_logprobs(tiny_server: RemoteSurgeServer) -> None:
    client = tiny_server.client()
    resp = client.chat.completions.create(
        model=tiny_server_model(tiny_server),
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the sampled token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    comp = client.completions.create(
        model=tiny_server_model(tiny_server),
        prompt="hello",
        max_tokens=3,
        temperature=0,
        logprobs=2,
    )
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(t) <= 2 for t in lp.top_logprobs)


BAD_INPUTS = [
    ("malformed JSON", b'{"messages": [', 400, None),
    ("wrong type", {"messages": MESSAGES, "max_tokens": "many"}, 400, "max_tokens"),
    ("wrong message type", {"messages": "hello"}, 400, "messages"),
    ("negative max_tokens", {"messages": MESSAGES, "max_tokens": -3}, 400, "max_tokens"),
    ("bad temperature", {"messages": MESSAGES, "temperature": -1}, 400, "temperature"),
    ("huge prompt", {"messages": [{"role": "user", "content": "hello " * 3000}]}, 400, "messages"),
    ("too many tokens", {"messages": MESSAGES, "max_tokens": 100000}, 400, "max_tokens"),
    ("unknown model", {"model": "gpt-17", "messages": MESSAGES}, 404, "model"),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "param"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input(
    tiny_server: RemoteSurgeServer, case: str, body: object, status: int, param: str | None
) -> None:
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(tiny_server.url("/v1/chat/completions"), timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if case == "huge prompt":
        assert "512" in err["message"]  # states the limit
    assert httpx.get(tiny_server.url("/health")).status_code == 200


def test_body_limit_and_unknown_route(tiny_server: RemoteSurgeServer) -> None:
    r = httpx.post(tiny_server.url("/v1/completions"), json={"prompt": "x" * 70000}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(tiny_server.url("/v1/nothing-here"))
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        tiny_server.client().chat.completions.create(model="nope", messages=MESSAGES)


def test_metrics_names(tiny_server: RemoteSurgeServer) -> None:
    text = httpx.get(tiny_server.url("/metrics")).text
    for name in [
        "surge:num_requests_running",
        "surge:num_requests_waiting",
        "surge:kv_cache_usage_perc",
        "surge:num_preemptions_total",
        "surge:prompt_tokens_total",
        "surge:generation_tokens_total",
        "surge:request_success_total",
        "surge:time_to_first_token_seconds_bucket",
        "surge:inter_token_latency_seconds_bucket",
        "surge:e2e_request_latency_seconds_bucket",
        "surge:request_queue_time_seconds_bucket",
        "surge:request_rejected_total",
        "surge:prefix_cache_queries_total",
        "surge:prefix_cache_hits_total",
    ]:
        assert f"\n{name}" in text or f"# TYPE {name}" in text, name
    assert httpx.get(tiny_server.url("/ready")).json()["status"] == "ready"


def test_prefix_cache_hits_reach_metrics(tiny_server: RemoteSurgeServer) -> None:
    def value(name: str) -> float:
        return tiny_server.metrics()[name]  # summed over the model label

    before = value("surge:prefix_cache_hits_total")
    prompt = "The quick brown fox jumps over the lazy dog. " * 8  # several full KV blocks
    for _ in range(2):
        tiny_server.client().completions.create(
            model=tiny_server_model(tiny_server), prompt=prompt, max_tokens=1
        )
    assert value("surge:prefix_cache_hits_total") > before
    assert value("surge:prefix_cache_queries_total") >= value("surge:prefix_cache_hits_total")


def test_open_loopback_api_refuses_foreign_host_headers(tiny_server: RemoteSurgeServer) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not reach the API."""
    r = httpx.get(tiny_server.url("/v1/models"), headers={"Host": "evil.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    ok = httpx.get(tiny_server.url("/v1/models"), headers={"Host": f"localhost:{tiny_server.port}"})
    assert ok.status_code == 200
