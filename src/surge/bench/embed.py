"""`surge bench embed`: embeddings throughput vs sentence-transformers and a naive server, cold
start of on-demand models, and chat throughput beside an embedding ingestion; JSON + a table."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from surge.bench.embed_load import make_chunks
from surge.bench.embed_parts import EmbedBenchConfig, run_cold_start, run_mixed, run_throughput
from surge.bench.embed_report import format_tables
from surge.bench.machine import machine_info
from surge.bench.serve import _finite, _interrupt
from surge.encoders import DEFAULT_EMBEDDING_MODEL_NAME
from surge.models.default_model import DEFAULT_MODEL_NAME

logger = logging.getLogger(__name__)

RESULT_VERSION = 1
PARTS = ("throughput", "cold-start", "mixed")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def config_from_args(args: argparse.Namespace) -> EmbedBenchConfig:
    """Normalize the CLI flags (comma lists -> tuples, threads resolved to a number)."""
    import torch

    parts = _csv(args.parts)
    unknown = set(parts) - set(PARTS) | set(_csv(args.baselines)) - {"direct", "naive"}
    if unknown:
        raise SystemExit(f"unknown part or baseline: {', '.join(sorted(unknown))}")
    return EmbedBenchConfig(
        parts=parts,
        duration_s=args.duration,
        concurrency=tuple(int(c) for c in _csv(args.concurrency)),
        num_threads=args.threads or torch.get_num_threads(),
        seed=args.seed,
        num_texts=args.num_texts,
        chinese_fraction=args.chinese_fraction,
        direct_batch_size=args.direct_batch_size,
        baselines=_csv(args.baselines),
        cold_start_repeats=args.cold_start_repeats,
        chat_concurrency=args.chat_concurrency,
        chat_max_tokens=args.chat_max_tokens,
        ingest_clients=args.ingest_clients,
        ingest_texts_per_request=args.ingest_texts_per_request,
        chat_model=args.chat_model,
        embedding_model=args.embedding_model,
        target=args.target.rstrip("/").removesuffix("/v1") if args.target else None,
    )


def default_output(cpu: str, day: str) -> Path:
    """benchmarks/results/embed-<cpu>-<date>.json, the CPU name as a slug."""
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") or "cpu"
    return Path("benchmarks") / "results" / f"embed-{slug}-{day}.json"


def run_embed_bench(args: argparse.Namespace, argv: list[str]) -> dict[str, object]:
    """The whole run: the parts in order, then one JSON file and the printed tables."""
    import sentence_transformers

    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = config_from_args(args)
    texts = make_chunks(cfg.num_texts, cfg.seed, cfg.chinese_fraction)
    machine = machine_info()
    machine["sentence_transformers"] = sentence_transformers.__version__
    result: dict[str, object] = {
        "version": RESULT_VERSION,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(["surge", *argv]),
        "machine": machine,
        "config": asdict(cfg),
    }
    runners = {"throughput": run_throughput, "cold-start": run_cold_start, "mixed": run_mixed}
    for part in cfg.parts:
        result[part.replace("-", "_")] = runners[part](cfg, texts)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    output = Path(args.output or default_output(str(machine["cpu"]), time.strftime("%Y-%m-%d")))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(_finite(result), indent=1, default=str) + "\n")
    logger.info("results: %s", output)
    print(format_tables(result))
    return result


def add_embed_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `surge bench embed`."""
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS)
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load point")
    parser.add_argument("--concurrency", default="1,8,32", help="embedding clients, comma list")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads everywhere (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-texts", type=int, default=1024, help="distinct chunks, cycled")
    parser.add_argument("--chinese-fraction", type=float, default=0.5)
    parser.add_argument("--direct-batch-size", type=int, default=32)
    parser.add_argument("--baselines", default="direct,naive", help="comma list: direct,naive")
    parser.add_argument("--cold-start-repeats", type=int, default=3)
    parser.add_argument("--chat-concurrency", type=int, default=32)
    parser.add_argument("--chat-max-tokens", type=int, default=64)
    parser.add_argument("--ingest-clients", type=int, default=8)
    parser.add_argument("--ingest-texts-per-request", type=int, default=1)
    parser.add_argument("--chat-model", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--embedding-model", default=DEFAULT_EMBEDDING_MODEL_NAME)
    parser.add_argument(
        "--target",
        default=None,
        help="URL of a running surge: measured instead of one this run starts (throughput, mixed)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="JSON path (default benchmarks/results/embed-<cpu>-<date>.json)",
    )


def main_embed(args: argparse.Namespace) -> int:
    """CLI entry: SIGTERM/SIGINT unwind like Ctrl-C, so the servers this run started stop."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    run_embed_bench(args, sys.argv[1:])
    return 0
