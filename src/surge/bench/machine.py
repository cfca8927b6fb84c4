"""What a benchmark ran on: the CPU (name, family/model, the ISA flags the kernels care about),
the linear kernel the process chose, memory and software versions. Printed and stored with every
result, so numbers from different CPUs are never mixed."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

# the vector ISA flags that change which kernel runs and how fast
ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpuinfo_field(text: str, key: str) -> str:
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return ""


def cpu_info() -> dict[str, object]:
    """The CPU's name, family/model numbers and the ISA flags of ISA_FLAGS it has."""
    from surge.kernels import cpu_flags

    text = _read("/proc/cpuinfo")
    have = cpu_flags()
    return {
        "cpu": _cpuinfo_field(text, "model name") or platform.processor(),
        "cpu_family": _cpuinfo_field(text, "cpu family"),
        "cpu_model": _cpuinfo_field(text, "model"),
        "cpu_flags": [f for f in ISA_FLAGS if f in have],
    }


def linear_kernel() -> str:
    """The bf16 and quantized linear implementations surge's kernels chose in this process (or
    why none)."""
    from surge.kernels import load_cpu_kernels

    kernels = load_cpu_kernels()
    if kernels is None:
        return "none (CPU kernels off)"
    dense = kernels.linear_isa if kernels.has_linear else "oneDNN (no AVX-512 BF16)"
    return f"{dense}, quantized {kernels.qlinear_isa}"


def machine_info() -> dict[str, object]:
    """CPU, cores, memory, the chosen linear kernel and software versions, for results files."""
    import torch
    import transformers

    mem_kb = next(
        (
            int(line.split()[1])
            for line in _read("/proc/meminfo").splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    return cpu_info() | {
        "num_cpus": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "linear_kernel": linear_kernel(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hostname": socket.gethostname(),
    }


def describe_cpu(info: dict[str, object]) -> str:
    """One line: 'Intel(R) Xeon(R) Processor (family 6, model 207; avx512_bf16, amx_bf16; ...)'."""
    flags = ", ".join(info.get("cpu_flags") or []) or "no AVX-512/AMX"
    family, model = info.get("cpu_family"), info.get("cpu_model")
    ident = f"family {family}, model {model}; " if family else ""
    kernel = f"; linear kernel {info['linear_kernel']}" if info.get("linear_kernel") else ""
    cores = f"{info['num_cpus']} CPUs, " if info.get("num_cpus") else ""
    return f"{cores}{info.get('cpu')} ({ident}{flags}{kernel})"
