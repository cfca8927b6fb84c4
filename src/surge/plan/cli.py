"""`surge plan MODEL --memory 24GiB --device rtx3090 ...`: the command's flags and its entry point."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from surge.config import EngineConfig
from surge.models.quant import QUANTIZATION_METHODS
from surge.plan.arch import load_source
from surge.plan.devices import DEVICES, get_device
from surge.plan.estimate import PlanSettings
from surge.plan.planner import make_plan, resolve_dtype
from surge.plan.report import devices_table, to_json, to_text
from surge.plan.units import parse_rate, parse_size

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_CONTEXT = 4096


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    """Register `surge plan` on the CLI's subcommands."""
    p = sub.add_parser(
        "plan",
        help="capacity planning: memory, KV cache, concurrent users and speed bounds of a model",
        description="What MODEL needs on a device, from its config alone (no weights read): "
        "weights, KV bytes per token, the most concurrent sequences at a context, and upper "
        "bounds on decode speed from the device's bandwidth and compute.",
    )
    add_plan_args(p)
    p.set_defaults(func=cmd_plan)


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """The flags of `surge plan`."""
    d = EngineConfig()
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="config.json, HF model directory, .gguf file, or a bundled model name "
        "(default: the bundled chat model)",
    )
    p.add_argument("--memory", type=parse_size, help="device memory (GPU) or RAM, e.g. 24GiB, 80G")
    p.add_argument("--device", default="cpu", help=f"one of: {', '.join(DEVICES)} (default cpu)")
    p.add_argument(
        "--context",
        type=int,
        help=f"tokens each sequence holds, prompt + reply (default {DEFAULT_CONTEXT} or the "
        "model's own context length if shorter)",
    )
    p.add_argument("--users", type=int, help="answer: can this many users chat at once?")
    p.add_argument("--quantization", choices=QUANTIZATION_METHODS, default="auto")
    p.add_argument("--dtype", choices=("auto", *_DTYPE_BYTES), default="auto")
    p.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        help="the engine's KV cache budget; default: memory - weights - reserve",
    )
    p.add_argument("--reserve", type=parse_size, help="memory kept back (default 10%%, >= 1 GiB)")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--bandwidth", type=parse_rate, help="override the device's, e.g. 80GB/s")
    p.add_argument("--tflops", type=float, help="override the device's dense 16-bit TFLOP/s")
    p.add_argument(
        "--min-speed",
        type=float,
        default=10.0,
        help="tokens/s each user needs for a yes (default 10: faster than people read)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--list-devices", action="store_true", help="print the device table and exit")


def cmd_plan(args: argparse.Namespace) -> int:
    """Run `surge plan`; 0 when the answer is yes, 1 when no, 2 on bad input."""
    if args.list_devices:
        print(devices_table())
        return 0
    try:
        device = get_device(args.device)
        if args.bandwidth is not None or args.tflops is not None:
            device = dataclasses.replace(
                device,
                bandwidth=args.bandwidth if args.bandwidth is not None else device.bandwidth,
                flops=args.tflops * 1e12 if args.tflops is not None else device.flops,
                description=f"{device.description} (peaks from --bandwidth/--tflops)",
            )
        memory = args.memory if args.memory is not None else device.memory_bytes
        if memory is None:
            raise ValueError(f"--memory is needed for {device.name} (how much RAM to plan for)")
        source = load_source(args.model)
        context = (
            args.context if args.context is not None else min(DEFAULT_CONTEXT, source.max_model_len)
        )
        if context <= 0 or (args.users is not None and args.users <= 0):
            raise ValueError("--context and --users must be positive")
        settings = PlanSettings(
            memory_bytes=memory,
            context_len=context,
            dtype_bytes=_DTYPE_BYTES[resolve_dtype(args.dtype, device)],
            block_size=args.block_size,
            max_num_seqs=args.max_num_seqs,
            kv_cache_memory=args.kv_cache_memory,
            reserve_bytes=args.reserve,
            users=args.users,
            min_tokens_per_s=args.min_speed,
        )
        plan = make_plan(source, device, args.dtype, args.quantization, settings)
    except ValueError as e:
        print(f"surge plan: {e}", file=sys.stderr)
        return 2
    print(to_json(plan) if args.json else to_text(plan))
    return 0 if plan.fits else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m surge.plan.cli`: the command without the rest of surge's CLI."""
    parser = argparse.ArgumentParser(prog="surge plan")
    add_plan_args(parser)
    return cmd_plan(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
