"""Several models in one `surge serve`: two chat models of different architectures, an embedding
model and a reranker side by side; load on demand, eviction under a budget, admin load/unload,
keep_alive, a model that fails to load. Real servers on 127.0.0.1, tiny random models."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.encoders.tiny_encoders import make_tiny_embedding_dir, make_tiny_reranker_dir
from tests.server.conftest import TINY_ARGS
from tests.server.utils import RemoteSurgeServer, remote_server, sse_events
from tests.tiny_models import make_tiny_model_dir

pytestmark = pytest.mark.timeout(600)

ADMIN = "sk-admin-test"
PROMPTS = ["Paris is the capital", "The quick brown fox", "def add(a, b):", "你好，世界"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("several-models")
    return {
        "llama": make_tiny_model_dir(root / "llama", "llama", seed=1),
        "qwen": make_tiny_model_dir(root / "qwen", "qwen2", seed=2),
        "emb": make_tiny_embedding_dir(root / "emb"),
        "rr": make_tiny_reranker_dir(root / "rr"),
    }


@pytest.fixture(scope="module")
def multi_server(model_dirs: dict[str, Path]) -> Iterator[RemoteSurgeServer]:
    args = [*TINY_ARGS, "--num-kv-blocks", "64"]
    for name, path in model_dirs.items():
        args += ["--model", f"{name}={path}"]
    with remote_server(None, args) as server:
        yield server


def complete(server: RemoteSurgeServer, model: str, prompt: str, max_tokens: int = 12) -> str:
    resp = httpx.post(
        server.url("/v1/completions"),
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_models_listed_with_kind_state_and_xinference_fields(
    multi_server: RemoteSurgeServer,
) -> None:
    data = {m["id"]: m for m in httpx.get(multi_server.url("/v1/models")).json()["data"]}
    assert set(data) == {"llama", "qwen", "emb", "rr"}
    assert [data[n]["kind"] for n in ("llama", "qwen", "emb", "rr")] == [
        "chat",
        "chat",
        "embedding",
        "rerank",
    ]
    assert {m["state"] for m in data.values()} == {"loaded"}
    assert data["llama"]["model_type"] == "LLM" and data["llama"]["model_ability"] == [
        "chat",
        "generate",
    ]
    assert data["emb"]["model_type"] == "embedding" and data["rr"]["model_type"] == "rerank"
    assert data["llama"]["max_model_len"] == 512 and data["emb"]["max_model_len"] > 0
    ready = httpx.get(multi_server.url("/ready")).json()
    assert ready["status"] == "ready" and set(ready["models"]) == set(data)


def test_each_chat_model_answers_under_its_name_isolated_under_mixed_load(
    multi_server: RemoteSurgeServer,
) -> None:
    alone = {(m, p): complete(multi_server, m, p) for m in ("llama", "qwen") for p in PROMPTS}
    assert alone[("llama", PROMPTS[0])] != alone[("qwen", PROMPTS[0])]  # different models

    async def mixed() -> dict[tuple[str, str], str]:
        client = multi_server.async_client()
        jobs = [(m, p) for _ in range(3) for m in ("llama", "qwen") for p in PROMPTS]
        outs = await asyncio.gather(
            *(
                client.completions.create(model=m, prompt=p, max_tokens=12, temperature=0)
                for m, p in jobs
            )
        )
        for (m, _), out in zip(jobs, outs, strict=True):
            assert out.model == m
        return {job: out.choices[0].text for job, out in zip(jobs, outs, strict=True)}

    assert asyncio.run(mixed()) == alone


def test_wrong_model_or_route(multi_server: RemoteSurgeServer) -> None:
    def post(path: str, body: dict[str, object]) -> httpx.Response:
        return httpx.post(multi_server.url(path), json=body, timeout=60)

    r = post("/v1/completions", {"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = post("/v1/completions", {"model": "emb", "prompt": "x"})
    assert r.status_code == 400 and "/v1/embeddings" in r.json()["error"]["message"]
    r = post("/v1/embeddings", {"model": "llama", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_kind"
    r = post("/v1/embeddings", {"model": "emb", "input": [[1, 2, 10**6]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = post("/v1/embeddings", {"model": "emb", "input": "x", "dimensions": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    r = post("/v1/rerank", {"model": "rr", "query": "q", "documents": []})
    assert r.status_code == 400


def test_embeddings_equal_sentence_transformers(
    multi_server: RemoteSurgeServer, model_dirs: dict[str, Path]
) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["The quick brown fox", "你好，世界！", "Paris is the capital of France."]
    expected = SentenceTransformer(str(model_dirs["emb"]), device="cpu").encode(texts)
    client = multi_server.client()
    batched = client.embeddings.create(model="emb", input=texts)
    got = np.array([d.embedding for d in batched.data])
    assert np.abs(got - expected).max() < 1e-4
    assert batched.usage.prompt_tokens > 0
    single = client.embeddings.create(model="emb", input=texts[1])
    assert np.abs(np.array(single.data[0].embedding) - expected[1]).max() < 1e-4
    b64 = client.embeddings.create(model="emb", input=texts, encoding_format="base64")
    row = np.frombuffer(base64.b64decode(b64.data[2].embedding), dtype="<f4")
    assert np.abs(row - expected[2]).max() < 1e-4


def test_concurrent_one_text_requests_are_batched(multi_server: RemoteSurgeServer) -> None:
    def batches() -> tuple[float, float]:
        m = multi_server.metrics()
        return m.get("surge:encoder_batches_total", 0.0), m.get("surge:encoder_rows_total", 0.0)

    before = batches()

    async def fan_out() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(
                *(
                    client.post(
                        multi_server.url("/v1/embeddings"),
                        json={"model": "emb", "input": f"sentence number {i}"},
                    )
                    for i in range(64)
                )
            )
        assert all(r.status_code == 200 for r in rs)

    asyncio.run(fan_out())
    after = batches()
    num_batches, rows = after[0] - before[0], after[1] - before[1]
    print(f"64 one-text requests ran in {num_batches:.0f} model batches")
    assert rows == 64 and num_batches <= 16


def test_rerank_sorted_scores_equal_cross_encoder(
    multi_server: RemoteSurgeServer, model_dirs: dict[str, Path]
) -> None:
    from sentence_transformers import CrossEncoder

    query, docs = "capital of France", ["Paris is in France", "a fox", "Berlin", "你好"]
    expected = CrossEncoder(str(model_dirs["rr"]), device="cpu").predict([(query, d) for d in docs])
    r = httpx.post(
        multi_server.url("/v1/rerank"),
        json={"model": "rr", "query": query, "documents": docs, "top_n": 3},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    for x in results:
        assert abs(x["relevance_score"] - float(expected[x["index"]])) < 1e-4
        assert x["document"]["text"] == docs[x["index"]]


# ---- on demand, budget, admin ------------------------------------------------------------


@pytest.fixture(scope="module")
def demand_server(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path]
) -> Iterator[RemoteSurgeServer]:
    """Nothing loaded at start: a models dir (two chat models and a corrupt one), a budget that
    holds one chat model (each costs its weights + 64 KV blocks... + 2 GiB KV by default), admin."""
    root = tmp_path_factory.mktemp("models-dir")
    for name in ("llama", "qwen"):
        (root / name).symlink_to(model_dirs[name], target_is_directory=True)
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    args = [*TINY_ARGS, "--models-dir", str(root), "--memory-budget", "3GiB"]
    args += ["--admin-api-key", ADMIN, "--keepalive-interval", "0.05", "--unload-grace", "0.5"]
    args += ["--max-num-seqs", "1"]  # n=8 choices run one after another: a long request
    with remote_server(None, args) as server:
        yield server


def states(server: RemoteSurgeServer) -> dict[str, str]:
    return {m["id"]: m["state"] for m in httpx.get(server.url("/v1/models")).json()["data"]}


def test_load_on_demand_streams_keepalives_then_answers(demand_server: RemoteSurgeServer) -> None:
    assert states(demand_server) == {"broken": "unloaded", "llama": "unloaded", "qwen": "unloaded"}
    body = {"model": "llama", "prompt": "Paris", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", demand_server.url("/v1/completions"), json=body, timeout=300) as r:
        assert r.status_code == 200
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert any(e.startswith(":") for e in events), "no keep-alive while the model loaded"
    assert states(demand_server)["llama"] == "loaded"


def test_budget_evicts_the_idle_model_and_refuses_what_cannot_fit(
    demand_server: RemoteSurgeServer,
) -> None:
    complete(demand_server, "llama", "Paris", 2)
    complete(demand_server, "qwen", "Paris", 2)  # evicts idle llama: the budget holds one
    s = states(demand_server)
    assert s["qwen"] == "loaded" and s["llama"] == "unloaded"
    # while qwen has a request in flight it can't be evicted: llama's load fails at once, 503
    body = {"model": "qwen", "prompt": "x", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", demand_server.url("/v1/completions"), json=body, timeout=300) as r:
        lines = r.iter_lines()
        next(e for e in sse_events(lines) if not e.startswith(":"))  # qwen is generating
        refused = httpx.post(
            demand_server.url("/v1/completions"),
            json={"model": "llama", "prompt": "x", "max_tokens": 2},
            timeout=120,
        )
        rest = list(sse_events(lines))
    assert refused.status_code == 503, refused.text
    message = refused.json()["error"]["message"]
    assert "budget" in message and "GiB" in message
    assert rest[-1] == "[DONE]"  # the stream in flight finished untouched


def test_unload_past_its_grace_ends_in_flight_requests_with_an_error(
    demand_server: RemoteSurgeServer,
) -> None:
    complete(demand_server, "qwen", "Paris", 2)  # loaded (llama, if loaded, is evicted)
    body = {"model": "qwen", "prompt": "x", "max_tokens": 480, "n": 8, "stream": True}
    body["ignore_eos"] = True
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.stream("POST", demand_server.url("/v1/completions"), json=body, timeout=300) as r:
        lines = r.iter_lines()
        next(e for e in sse_events(lines) if not e.startswith(":"))  # generating
        unload = httpx.post(demand_server.url("/v1/models/qwen/unload"), headers=admin, timeout=120)
        rest = list(sse_events(lines))
    assert unload.status_code == 200 and unload.json()["aborted"] == 1
    errors = [json.loads(e) for e in rest if e.startswith("{") and '"error"' in e]
    assert rest[-1] == "[DONE]" and errors, rest[-3:]
    assert "unloaded" in errors[0]["error"]["message"]
    assert states(demand_server)["qwen"] == "unloaded"


def test_corrupt_model_fails_with_reason_others_keep_serving(
    demand_server: RemoteSurgeServer,
) -> None:
    r = httpx.post(
        demand_server.url("/v1/completions"),
        json={"model": "broken", "prompt": "x", "max_tokens": 2},
        timeout=120,
    )
    assert r.status_code == 503 and "broken" in r.json()["error"]["message"]
    card = next(
        m for m in httpx.get(demand_server.url("/v1/models")).json()["data"] if m["id"] == "broken"
    )
    assert card["state"] == "failed" and card["reason"]
    assert complete(demand_server, "qwen", "Paris", 2) is not None


def test_admin_load_unload_and_request_keep_alive(demand_server: RemoteSurgeServer) -> None:
    url = demand_server.url("/v1/models/qwen/unload")
    assert httpx.post(url).status_code == 401
    assert httpx.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(url, headers=admin, timeout=120)
    assert r.status_code == 200 and r.json()["state"] == "unloaded"
    r = httpx.post(demand_server.url("/v1/models/llama/load"), headers=admin, timeout=300)
    assert r.status_code == 200 and r.json()["state"] == "loaded"
    assert httpx.post(demand_server.url("/v1/models/nope/load"), headers=admin).status_code == 404
    # keep_alive 0 on a request: unloaded as soon as it is idle
    body = {"model": "llama", "prompt": "x", "max_tokens": 2, "keep_alive": 0}
    assert httpx.post(demand_server.url("/v1/completions"), json=body, timeout=120).is_success
    for _ in range(200):
        if states(demand_server)["llama"] == "unloaded":
            break
        asyncio.run(asyncio.sleep(0.1))
    assert states(demand_server)["llama"] == "unloaded"
    bad = {"model": "llama", "prompt": "x", "keep_alive": "soon"}
    r = httpx.post(demand_server.url("/v1/completions"), json=bad, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"


# ---- the bundled embedding model, through the official clients ---------------------------


@pytest.fixture(scope="module")
def minilm_server() -> Iterator[RemoteSurgeServer]:
    with remote_server(None, ["--model", "all-MiniLM-L6-v2", "--threads", "1"]) as server:
        yield server


def test_bundled_minilm_equals_sentence_transformers_via_openai_and_langchain(
    minilm_server: RemoteSurgeServer,
) -> None:
    from langchain_openai import OpenAIEmbeddings
    from sentence_transformers import SentenceTransformer

    from surge.encoders import pull_default_embedding_model

    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "机器学习和自然语言处理。",
        "How do I build a knowledge base?",
        "知识库问答需要向量检索。",
    ]
    expected = SentenceTransformer(str(pull_default_embedding_model()), device="cpu").encode(texts)
    client = minilm_server.client()
    got = [
        d.embedding for d in client.embeddings.create(model="all-MiniLM-L6-v2", input=texts).data
    ]
    assert np.abs(np.array(got) - expected).max() < 1e-4
    one = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[1]).data[0].embedding
    assert np.abs(np.array(one) - expected[1]).max() < 1e-4
    lc = OpenAIEmbeddings(
        model="all-MiniLM-L6-v2",
        base_url=minilm_server.url("/v1"),
        api_key="none",  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
    )
    assert np.abs(np.array(lc.embed_documents(texts)) - expected).max() < 1e-4
    assert np.abs(np.array(lc.embed_query(texts[3])) - expected[3]).max() < 1e-4
