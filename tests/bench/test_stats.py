"""The suite's pure parts on hand-made data: SSE parsing, statistics, workloads, the report."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import struct

import pytest

from surge.bench.loadgen import (
    RequestOptions,
    RequestResult,
    StreamAccumulator,
    make_session,
    send_chat,
    sse_data,
)
from surge.bench.metrics import (
    Slo,
    client_cache_hit_rate,
    hit_rate_between,
    parse_prometheus,
    percentile,
    prefix_cache_counters,
    summarize,
)
from surge.bench.report import replace_section
from surge.bench.workloads import WORKLOADS, Prompt, make_workload


def _chunk(content: str | None = None, usage: dict | None = None) -> str:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    return json.dumps({"choices": choices, **({"usage": usage} if usage else {})})


def test_sse_data_lines() -> None:
    assert sse_data("data: {}") == "{}"
    assert sse_data("data:[DONE]") == "[DONE]"
    assert sse_data("data:  x") == " x"  # only one leading space belongs to the syntax
    assert sse_data(": keep-alive") is None
    assert sse_data("event: message") is None
    assert sse_data("") is None


def test_stream_with_usage() -> None:
    acc = StreamAccumulator(start=10.0)
    acc.feed(json.dumps({"choices": [{"delta": {"role": "assistant", "content": ""}}]}), 10.1)
    acc.feed(_chunk("Hel"), 10.5)
    acc.feed(_chunk("lo"), 10.6)
    acc.feed(_chunk(" you"), 10.8)
    acc.feed(_chunk(usage={"prompt_tokens": 7, "completion_tokens": 4}), 10.8)
    acc.feed("[DONE]", 10.8)
    r = acc.finish(11.0)
    assert r.ok and r.error is None
    assert r.ttft == pytest.approx(0.5)
    assert r.itls == pytest.approx([0.1, 0.2])
    assert (r.output_tokens, r.prompt_tokens, r.num_chunks) == (4, 7, 3)
    assert r.e2e == pytest.approx(1.0)
    assert r.tpot == pytest.approx(0.5 / 3)


def test_stream_without_usage_counts_chunks() -> None:
    acc = StreamAccumulator(start=0.0)
    for i, t in enumerate((0.2, 0.3, 0.4)):
        acc.feed(_chunk(f"t{i}"), t)
    acc.feed("[DONE]", 0.4)
    assert acc.finish(0.4).output_tokens == 3


def test_stream_errors() -> None:
    acc = StreamAccumulator(start=0.0)
    acc.feed(_chunk("a"), 0.1)
    acc.feed(json.dumps({"error": {"message": "boom", "code": "request_timeout"}}), 0.2)
    acc.feed("[DONE]", 0.2)
    r = acc.finish(0.2)
    assert not r.ok and r.error == "boom"
    cut = StreamAccumulator(start=0.0)
    cut.feed(_chunk("a"), 0.1)
    assert cut.finish(0.2).error == "stream ended without [DONE]"


def test_llama_server_timings_give_cache_hits() -> None:
    acc = StreamAccumulator(start=0.0)
    acc.feed(_chunk("a"), 0.1)
    acc.feed(json.dumps({"choices": [], "timings": {"cache_n": 30, "prompt_n": 10}}), 0.2)
    acc.feed("[DONE]", 0.2)
    r = acc.finish(0.2)
    assert (r.cached_tokens, r.prompt_tokens) == (30, 40)
    assert client_cache_hit_rate([r]) == pytest.approx(0.75)


def test_percentile_matches_linear_interpolation() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile(values, 90) == pytest.approx(4.6)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def _result(ttft: float, e2e: float, tokens: int, ok: bool = True) -> RequestResult:
    gaps = [(e2e - ttft) / (tokens - 1)] * (tokens - 1)
    return RequestResult(
        ok=ok,
        ttft=ttft,
        e2e=e2e,
        itls=gaps,
        num_chunks=tokens,
        output_tokens=tokens,
        error=None if ok else "x",
    )


def test_summarize_goodput_and_throughput() -> None:
    results = [
        _result(0.5, 1.5, 11),  # TPOT 0.1: meets both
        _result(2.0, 3.0, 11),  # TTFT too slow
        _result(0.2, 4.2, 11),  # TPOT 0.4: too slow
        _result(0.1, 0.1, 0, ok=False),
    ]
    s = summarize(results, duration=2.0, slo=Slo(ttft=1.0, tpot=0.1))
    assert (s["num_requests"], s["completed"], s["errors"]) == (4, 3, 1)
    assert s["output_tokens_per_s"] == pytest.approx(33 / 2)
    assert s["requests_per_s"] == pytest.approx(1.5)
    assert s["goodput_requests_per_s"] == pytest.approx(0.5)
    assert s["slo_attainment"] == pytest.approx(0.25)
    assert s["ttft_p50_ms"] == pytest.approx(500.0)
    assert s["tpot_p50_ms"] == pytest.approx(100.0)
    assert s["itl_p99_ms"] == pytest.approx(400.0)
    for key in ("ttft", "tpot", "itl", "e2e"):
        assert {f"{key}_p{q}_ms" for q in (50, 90, 95, 99)} <= s.keys()


def test_prometheus_prefix_cache_counters() -> None:
    text = (
        "# HELP vllm:prefix_cache_hits_total hits\n"
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 300.0\n'
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 400.0\n'
        "surge:num_requests_running 2.0\n"
    )
    samples = parse_prometheus(text)
    assert samples["surge:num_requests_running"] == 2.0
    assert prefix_cache_counters(samples) == (300.0, 400.0)
    assert prefix_cache_counters({"surge:num_requests_running": 1.0}) is None
    assert hit_rate_between((300.0, 400.0), (390.0, 500.0)) == pytest.approx(0.9)
    assert hit_rate_between(None, (1.0, 2.0)) is None


@pytest.mark.parametrize("name", WORKLOADS)
def test_workloads_are_seeded(name: str) -> None:
    a = make_workload(name, 20, 64, seed=1)
    assert a == make_workload(name, 20, 64, seed=1)
    assert a != make_workload(name, 20, 64, seed=2)
    assert len(a) == 20 and all(p.max_tokens > 0 and p.to_messages() for p in a)


def test_workload_shapes() -> None:
    shared = make_workload("shared-prefix", 10, 32)
    assert len({p.messages[0] for p in shared}) == 1  # one system prompt for all
    assert len({p.messages[1] for p in shared}) == 10  # distinct questions
    mix = make_workload("sharegpt", 200, 128)
    assert len({p.max_tokens for p in mix}) > 20 and max(p.max_tokens for p in mix) <= 256
    assert len({len(p.messages[0][1]) for p in mix}) > 100


def test_replace_section_keeps_the_rest() -> None:
    md = "# B\n\n## Offline\nkeep\n\n## Serving old\nold\n\n## Later\nalso keep\n"
    out = replace_section(md, "## Serving new\nnew\n")
    assert out == "# B\n\n## Offline\nkeep\n\n## Serving new\nnew\n\n## Later\nalso keep\n"
    assert replace_section("# B\n", "## Serving x\n") == "# B\n\n## Serving x\n"


async def _scripted_server(
    failures: int, body: bytes, seen: list[bytes], at_once: bool = False
) -> tuple[asyncio.Server, str]:
    """A raw HTTP server on 127.0.0.1: the first `failures` requests get a closed connection.

    at_once: closed (with a reset) as soon as it is accepted, before the request is read.
    """
    accepted: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        if at_once and len(accepted) <= failures:
            seen.append(b"{}")
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            return
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(
                b":"
            )[1]
        )
        seen.append(await reader.readexactly(length))
        if len(seen) > failures:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            )
            for i in range(0, len(body), 7):  # lines split across network reads
                writer.write(body[i : i + 7])
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("at_once", [False, True], ids=["after-request", "reset-at-once"])
@pytest.mark.parametrize("failures,ok", [(0, True), (1, True), (2, False)])
def test_send_chat_resends_once_on_a_stale_connection(
    failures: int, ok: bool, at_once: bool
) -> None:
    """A connection closed before any response is sent once more, never twice."""
    seen: list[bytes] = []
    stream = (
        f"data: {_chunk('hé')}\n\n: keep-alive\n\n"
        f"data: {_chunk('llo', {'completion_tokens': 2})}\r\n\r\ndata: [DONE]\n\n"
    ).encode()

    async def run() -> RequestResult:
        server, url = await _scripted_server(failures, stream, seen, at_once)
        async with server, make_session(4) as session:
            opts = RequestOptions(base_url=url, model="m")
            return await send_chat(session, opts, Prompt(messages=(("user", "x"),), max_tokens=4))

    result = asyncio.run(run())
    assert len(seen) == min(failures + 1, 2)
    assert result.ok is ok
    if ok:
        assert json.loads(seen[-1])["stream"] is True
        assert result.output_tokens == 2 and result.num_chunks == 2 and len(result.itls) == 1
    else:
        assert result.error.startswith(("ServerDisconnectedError", "ClientOSError"))
