"""surge on a local Ray cluster, end to end: run inside a new network namespace, where it brings
up loopback and nothing else (Ray's ports listen on every interface), by
tests/serving/test_ray_serve.py, which reads the JSON this writes. One cluster for every scenario, since Ray's start-up costs seconds.

    unshare -rn python -m tests.serving.ray_scenarios RESULT.json WORKDIR
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve

from surge.config import EngineConfig, ServerConfig
from surge.encoders import EncoderClient, EncoderConfig, EncoderRequestError
from surge.router import ModelKind, ModelSpec
from surge.server.models import ServedModels
from surge.serving.ray import APP_NAME, RayScaling, build_app
from tests.encoders.tiny_encoders import TINY_MAX_SEQ_LENGTH, make_tiny_embedding_dir
from tests.tiny_models import make_tiny_model_dir

MODEL = "tiny"
DEPLOYMENT = f"engine-{MODEL}"
EMBEDDER = "tiny-embed"
EMBED_TEXTS = ["hello ray", "embeddings through serve", "一二三"]
TOO_LONG = " ".join(["hello"] * 2 * TINY_MAX_SEQ_LENGTH)
LONG = 300  # tokens: streams that stay open while the cluster changes under them
CONTEXT = 32768
# far more than the host makes before the client's disconnect reaches it (through Serve's proxy
# and the ingress), so a sequence that ends without an abort is one whose cancel was lost
DISCONNECT_TOKENS = 32000
DISCONNECT_TRIES = 3  # see disconnects()
# Scenario steps wait for the cluster, never for a fixed time; this only bounds a broken run.
PATIENCE_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.25)


def body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


async def stream_text(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict[str, Any]:
    """A streamed answer read to its end: text, whether [DONE] came, any error events."""
    text, done, errors = [], False, []
    async with client.stream(
        "POST", "/v1/chat/completions", json=body(prompt, max_tokens, True)
    ) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                errors.append(event["error"])
            for choice in event.get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
    return {"text": "".join(text), "done": done, "errors": errors}


async def answer(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> str:
    r = await client.post("/v1/chat/completions", json=body(prompt, max_tokens, False))
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT]
    return int(status.replica_states.get("RUNNING", 0))


def host_actors() -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT}#")
    )


async def host_counters() -> dict[str, Any]:
    """Some engine host's id, and its sequences in flight and aborted (the only host's, when
    there is one)."""
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP_NAME)
    return await handle.counters.remote()  # type: ignore[no-any-return]


async def busy_hosts(tries: int = 16) -> dict[str, int]:
    """The engine hosts seen with work, by id: each call lands on some host (Serve picks), so
    ask several times; a host not seen is not in the answer."""
    busy: dict[str, int] = {}
    for _ in range(tries):
        counters = await host_counters()
        if counters["work"] > 0:
            busy[counters["host"]] = counters["work"]
    return busy


async def scenarios(base: str, results: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        await wait_for("/ready", lambda: ready(client))

        # 0. embeddings through Serve (the model's own deployment), and a bad input's 400
        await embeddings(client, results)

        # 1. streaming chat through Serve: the same greedy text as a plain answer, [DONE] last
        streamed = await stream_text(client, "hello ray", 24)
        results["stream"] = {**streamed, "plain": await answer(client, "hello ray", 24)}

        # 2. a client that goes away mid-stream: its sequence is aborted on the remote host
        results["disconnect"] = await disconnects(client)

        # 3. load: the autoscaler adds a replica (target_work 2 per replica, 6 clients that
        # stream long answers one after another until told to stop)
        prompts = [f"stream number {i}" for i in range(6)]
        references = {p: await answer(client, p, LONG) for p in prompts}
        results["replicas_before"] = running_replicas()
        stop = asyncio.Event()
        streams: list[tuple[str, dict[str, Any]]] = []

        async def keep_streaming(prompt: str) -> None:
            while not stop.is_set():
                streams.append((prompt, await stream_text(client, prompt, LONG)))

        load = [asyncio.create_task(keep_streaming(p)) for p in prompts]
        await wait_for("a second replica", lambda: at_least(2))
        results["replicas_under_load"] = running_replicas()
        await wait_for("streams on both hosts", lambda: both_busy())
        metrics = (await client.get("/metrics")).text
        results["ready_rows"] = [
            line for line in metrics.splitlines() if line.startswith("surge:replica_ready{")
        ]
        results["host_actors"] = host_actors()

        # 4. one engine replica killed while streams run on it: they go on elsewhere (the
        # victim is the busiest host of the moment, so its streams can't all end before it dies;
        # asking "is some host busy" could pick an idle one, as it once did)
        busy: dict[str, int] = {}

        async def some_host_busy() -> bool:
            busy.clear()
            busy.update(await busy_hosts())
            return bool(busy)

        await wait_for("streams on a host", some_host_busy)
        victim_id = max(busy, key=lambda host: busy[host])
        victim = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT}#{victim_id}"
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        results["killed"] = victim
        await wait_for("the killed replica replaced", lambda: replaced(victim))
        stop.set()
        await asyncio.gather(*load)
        results["streams"] = [{**f, "same": f["text"] == references[p]} for p, f in streams]
        results["after_kill_plain"] = await answer(client, "hello ray", 24)

        # 5. load gone: back to one replica, then none
        await wait_for("scale down to one replica", lambda: at_most(1))
        results["replicas_after_load"] = running_replicas()
        await wait_for("scale down to zero", lambda: at_most(0))
        results["replicas_idle"] = running_replicas()

        # 6. a request to a model scaled to zero waits while a replica starts, then is answered
        results["woken_answer"] = await answer(client, "hello ray", 24)
        results["replicas_woken"] = running_replicas()
        metrics = (await client.get("/metrics")).text
        results["failovers_metric"] = [
            line for line in metrics.splitlines() if line.startswith("surge:request_failovers")
        ]


async def disconnects(client: httpx.AsyncClient) -> dict[str, Any]:
    """Clients that leave mid-stream, until one's sequence is aborted on the host: each leaves
    the host idle, and the aborts each one caused are listed. More than one try because Ray's
    cancellation of a handle call is best effort (its docs; ray-project/ray#52533): in about
    one run in seven here the cancel never reached the host, and the sequence ran to its end."""
    aborts, counters = [], await host_counters()
    for _ in range(DISCONNECT_TRIES):
        before = counters["aborted"]
        async with client.stream(
            "POST", "/v1/chat/completions", json=body("go away", DISCONNECT_TOKENS, True)
        ) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    break
        await wait_for("the abort on the host", lambda: idle())
        counters = await host_counters()
        aborts.append(counters["aborted"] - before)
        if aborts[-1]:
            break
    return {"aborts": aborts, "work": counters["work"]}


async def embeddings(client: httpx.AsyncClient, results: dict[str, Any]) -> None:
    r = await client.post("/v1/embeddings", json={"model": EMBEDDER, "input": EMBED_TEXTS})
    assert r.status_code == 200, r.text
    results["embeddings_served"] = [d["embedding"] for d in r.json()["data"]]
    r = await client.post(
        "/v1/embeddings", json={"model": EMBEDDER, "input": [TOO_LONG], "truncate": False}
    )
    results["embeddings_bad"] = {"status": r.status_code, "body": r.json()}
    status = serve.status().applications[APP_NAME].deployments[f"encoder-{EMBEDDER}"]
    results["encoder_replicas"] = int(status.replica_states.get("RUNNING", 0))
    metrics = (await client.get("/metrics")).text
    results["encoder_metrics"] = [
        line for line in metrics.splitlines() if line.startswith("surge:encoder_")
    ]


async def local_embeddings(model: Path) -> dict[str, Any]:
    """The same calls on an encoder worker of this process: what Serve's answers must equal."""
    client = await EncoderClient.start(EncoderConfig(model, num_threads=1))
    try:
        rows = (await client.embed(EMBED_TEXTS)).embeddings.tolist()
        try:
            await client.embed([TOO_LONG], truncate=False)
            bad = None
        except EncoderRequestError as e:
            bad = str(e)
        stats = client.stats
        return {"rows": rows, "bad": bad, "batches": stats.num_batches, "num_rows": stats.num_rows}
    finally:
        await client.close()


async def ready(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/ready")).status_code == 200
    except httpx.HTTPError:
        return False


async def idle() -> bool:
    return (await host_counters())["work"] == 0


async def at_least(n: int) -> bool:
    return running_replicas() >= n


async def at_most(n: int) -> bool:
    return running_replicas() <= n and len(host_actors()) <= n


async def both_busy() -> bool:
    """Two hosts, each seen with work."""
    return len(host_actors()) >= 2 and len(await busy_hosts()) >= 2


async def replaced(victim: str) -> bool:
    return victim not in host_actors() and running_replicas() >= 1


def loopback_up() -> None:
    """Bring up `lo` in this (new, empty) network namespace, as `ip link set lo up` would."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def main(result_path: Path, work: Path) -> None:
    loopback_up()
    # the replicas' work reaches the autoscaler twice a second, not every 10 s (inherited by
    # the local cluster's processes)
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    model = make_tiny_model_dir(work / MODEL, max_position_embeddings=CONTEXT)
    embedder = make_tiny_embedding_dir(work / EMBEDDER)
    local = asyncio.run(local_embeddings(embedder))  # before the cluster takes the CPUs
    port = free_port()
    # two for the engine's replicas under load, one for the embedding model's replica
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    engine = EngineConfig(model=str(model), dtype="float32", num_threads=1)
    spec = ModelSpec(MODEL, str(model), ModelKind.CHAT, keep_alive=None, pinned=True)
    embed_spec = ModelSpec(
        EMBEDDER, str(embedder), ModelKind.EMBEDDING, keep_alive=None, pinned=True
    )
    scaling = RayScaling(
        min_replicas=0,  # scale to zero once idle...
        initial_replicas=1,  # ...after starting with one
        max_replicas=2,
        target_work=2,
        num_cpus=1,
        upscale_delay_s=1.0,
        downscale_delay_s=6.0,
        health_check_period_s=1.0,
    )
    server = ServerConfig(host="127.0.0.1", port=port)
    served = ServedModels((spec, embed_spec), (MODEL, EMBEDDER))
    app = build_app(engine, server, served, None, scaling)
    serve.run(app, name=APP_NAME)
    results: dict[str, Any] = {"embeddings_local": local}
    try:
        asyncio.run(scenarios(f"http://127.0.0.1:{port}", results))
    except BaseException as e:  # what got this far is still worth reading
        results["error"] = repr(e)
        raise
    finally:
        result_path.write_text(json.dumps(results))
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
