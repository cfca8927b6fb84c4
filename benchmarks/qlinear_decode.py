"""The bundled model's quantized linears at decode batch sizes, alone: one token's worth of calls
(30 layers of qkv, o, gate_up, down in Q4_1, and the Q8_0 LM head), every weight distinct so
they stream from memory as in the model. Prints ms per token pass and the weight bytes/s.

    python benchmarks/qlinear_decode.py [--rows 1] [--threads 2] [--reps 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from surge.bench.machine import cpu_info, describe_cpu
from surge.kernels import load_cpu_kernels
from surge.models.quant import KERNEL_QTYPES, QuantizedTensor

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 576, 1536, 30, 49152
Q4_1, Q8_0 = 3, 8
SHAPES = (
    ("qkv", 960, HIDDEN),
    ("o", HIDDEN, HIDDEN),
    ("gate_up", 2 * INTERMEDIATE, HIDDEN),
    ("down", HIDDEN, INTERMEDIATE),
)


def random_quantized(qtype: int, rows: int, cols: int, rng: np.random.Generator) -> QuantizedTensor:
    """Random codes with small float16 scales and offsets."""
    _, block, size = KERNEL_QTYPES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    halves = (rng.standard_normal((rows, cols // block, 2)) * 0.01).astype(np.float16)
    data[:, :, 0:4] = halves.view(np.uint8).reshape(rows, cols // block, 4)
    return QuantizedTensor.from_gguf(qtype, data.reshape(rows, -1), (rows, cols))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = load_cpu_kernels()
    assert kernels is not None, "the CPU kernels did not build"
    rng = np.random.default_rng(0)
    layers = [
        [(name, random_quantized(Q4_1, n, k, rng)) for name, n, k in SHAPES] for _ in range(LAYERS)
    ]
    head = random_quantized(Q8_0, VOCAB, HIDDEN, rng)
    xs = {k: torch.randn(args.rows, k).to(torch.bfloat16) for k in (HIDDEN, INTERMEDIATE)}
    nbytes = sum(w.data.numel() for layer in layers for _, w in layer) + head.data.numel()

    def one_token() -> tuple[float, dict[str, float]]:
        parts = dict.fromkeys([s[0] for s in SHAPES] + ["lm_head"], 0.0)
        start = time.perf_counter()
        for layer in layers:
            for name, w in layer:
                t = time.perf_counter()
                kernels.qlinear(xs[w.shape[1]], [(0, w)], w.shape[0], None)
                parts[name] += time.perf_counter() - t
        t = time.perf_counter()
        kernels.qlinear(xs[HIDDEN], [(0, head)], VOCAB, None, out_dtype=torch.float32)
        parts["lm_head"] += time.perf_counter() - t
        return time.perf_counter() - start, parts

    for _ in range(5):
        one_token()
    runs = [one_token() for _ in range(args.reps)]
    total = statistics.median(r[0] for r in runs)
    print(describe_cpu(cpu_info()))
    print(
        f"rows {args.rows}, threads {args.threads}: {total * 1e3:.2f} ms a token pass "
        f"(median of {args.reps}), {nbytes / total / 1e9:.1f} GB/s of weights"
    )
    for name in runs[0][1]:
        print(f"  {name:8s} {statistics.median(r[1][name] for r in runs) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
