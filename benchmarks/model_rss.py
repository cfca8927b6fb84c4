#!/usr/bin/env python
"""Resident memory of one model per weight format: RSS after loading, minus RSS before.

    python benchmarks/model_rss.py MODEL QUANTIZATION [--dtype bfloat16]

Loads MODEL with `surge.LLM` (a 16-block KV cache, so the cache is a rounding error) in a fresh
process and prints one JSON line: the format, the weights summary and the RSS delta in MiB. Run it
once per format (each in its own process: freed memory is not always returned to the OS).
"""

from __future__ import annotations

import argparse
import json


def rss_mib() -> float:
    """This process's resident set size, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("quantization", choices=("auto", "none", "int8", "int4"))
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    import torch  # noqa: F401  (its own resident pages are not the model's)

    from surge import LLM
    from surge.kernels import load_cpu_kernels
    from surge.models.quant import weights_summary

    load_cpu_kernels()
    before = rss_mib()
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, num_kv_blocks=16)
    after = rss_mib()
    summary = weights_summary(llm.engine.core.runner.model)
    print(
        json.dumps(
            {
                "quantization": args.quantization,
                "weights": summary,
                "rss_mib": round(after - before, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
