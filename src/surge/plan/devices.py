"""Common GPUs and CPUs: memory, memory bandwidth and dense 16-bit compute, from spec sheets.

Every number is the vendor's theoretical peak (dense, no structured sparsity), so the speeds
computed from them are upper bounds: real kernels attain perhaps 60-90% of peak bandwidth and
less of peak compute. Memory is what the device reports (nvidia-smi's MiB), not the marketing GB.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

GiB = 2**30


class DeviceKind(str, Enum):
    """Which engine path serves on it: the CUDA reference path or the CPU kernels."""

    GPU = "gpu"
    CPU = "cpu"


@dataclass(frozen=True)
class Device:
    """One device's peaks; `memory_bytes` None for CPUs (RAM varies: pass --memory)."""

    name: str
    kind: DeviceKind
    description: str
    bandwidth: float  # bytes/s, theoretical peak
    flops: float  # dense bf16 (fp16 where no bf16) FLOP/s, theoretical peak
    memory_bytes: int | None = None
    bf16: bool = True  # runs bf16 natively (else the engine's "auto" dtype is fp16 / fp32)


def _gpu(
    name: str, desc: str, mem_gib: float, gbs: float, tflops: float, bf16: bool = True
) -> Device:
    return Device(name, DeviceKind.GPU, desc, gbs * 1e9, tflops * 1e12, int(mem_gib * GiB), bf16)


def _cpu(name: str, desc: str, gbs: float, tflops: float, bf16: bool = True) -> Device:
    return Device(name, DeviceKind.CPU, desc, gbs * 1e9, tflops * 1e12, None, bf16)


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        # NVIDIA Ampere GA102 whitepaper: 936 GB/s GDDR6X; BF16 tensor, FP32 accumulate, 71 dense
        _gpu("rtx3090", "NVIDIA GeForce RTX 3090 24 GB", 24, 936, 71),
        # NVIDIA Ada AD102 whitepaper: 1008 GB/s; BF16 tensor, FP32 accumulate, 165.2 dense
        _gpu("rtx4090", "NVIDIA GeForce RTX 4090 24 GB", 24, 1008, 165.2),
        # NVIDIA T4 datasheet: 320 GB/s, 65 FP16 tensor TFLOPS; Turing has no bf16
        _gpu("t4", "NVIDIA T4 16 GB", 15, 320, 65, bf16=False),
        # NVIDIA V100 SXM2 datasheet: 900 GB/s, 125 FP16 tensor TFLOPS; no bf16
        _gpu("v100-32g", "NVIDIA V100 SXM2 32 GB", 32, 900, 125, bf16=False),
        # NVIDIA A10 datasheet: 600 GB/s, 125 BF16 tensor TFLOPS (250 with sparsity)
        _gpu("a10", "NVIDIA A10 24 GB", 22.5, 600, 125),
        # NVIDIA L4 datasheet: 300 GB/s, 121 BF16 tensor TFLOPS (242 with sparsity)
        _gpu("l4", "NVIDIA L4 24 GB", 22.5, 300, 121),
        # NVIDIA L40S datasheet: 864 GB/s, 362 BF16 tensor TFLOPS (733 with sparsity)
        _gpu("l40s", "NVIDIA L40S 48 GB", 45, 864, 362),
        # NVIDIA A100 datasheet: 40 GB HBM2 1555 GB/s; 312 BF16 tensor TFLOPS (624 sparse)
        _gpu("a100-40g", "NVIDIA A100 40 GB (SXM)", 40, 1555, 312),
        # NVIDIA A100 datasheet: 80 GB HBM2e 2039 GB/s (SXM; PCIe 1935); 312 BF16 TFLOPS
        _gpu("a100-80g", "NVIDIA A100 80 GB (SXM)", 80, 2039, 312),
        # NVIDIA H100 datasheet: SXM 3.35 TB/s, 989 BF16 TFLOPS (1979 sparse); 79.6 GiB usable
        _gpu("h100", "NVIDIA H100 80 GB (SXM)", 79.6, 3350, 989),
        # NVIDIA H100 datasheet: PCIe 2.0 TB/s, 756 BF16 TFLOPS (1513 sparse)
        _gpu("h100-pcie", "NVIDIA H100 80 GB (PCIe)", 79.6, 2000, 756),
        # NVIDIA H200 datasheet: 141 GB HBM3e at 4.8 TB/s, 989 BF16 TFLOPS (SXM); ~140 GiB usable
        _gpu("h200", "NVIDIA H200 141 GB (SXM)", 140, 4800, 989),
        # CPUs: bandwidth = channels x 8 bytes x MT/s; compute = cores x GHz x FLOP/cycle.
        # A desktop with dual-channel DDR5-5600 (2 x 8 B x 5600 MT/s) and 8 cores doing
        # avx512_bf16 dot products (64 FLOP/cycle, 2 GHz all-core sustained under AVX-512);
        # assumes bf16 (Zen 4+, Xeon 4th gen+): pass --dtype float32 for older CPUs
        _cpu("cpu", "desktop CPU, 8 cores, dual-channel DDR5-5600", 89.6, 1.0),
        # the same with dual-channel DDR4-3200 (2 x 8 B x 3200 MT/s) and AVX2 fp32 only
        _cpu("cpu-ddr4", "desktop CPU, 8 cores, dual-channel DDR4-3200", 51.2, 0.5, bf16=False),
        # Intel Xeon Platinum 8480+ (Sapphire Rapids): 8 x DDR5-4800 = 307 GB/s; AMX bf16 is
        # 1024 FLOP/cycle/core: 56 cores x 2.0 GHz x 1024 = 115 TFLOP/s (GEMMs attain far less)
        _cpu("xeon-8480", "Intel Xeon Platinum 8480+, 56 cores, 8 x DDR5-4800", 307, 115),
        # AMD EPYC 9654 (Genoa): 12 x DDR5-4800 = 461 GB/s; AVX-512 bf16 on 256-bit units,
        # 64 FLOP/cycle/core: 96 cores x 2.4 GHz x 64 = 14.7 TFLOP/s
        _cpu("epyc-9654", "AMD EPYC 9654, 96 cores, 12 x DDR5-4800", 461, 14.7),
    )
}


def get_device(name: str) -> Device:
    """The table's entry; ValueError naming the choices."""
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}") from None
