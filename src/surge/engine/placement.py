"""Where each replica of a model runs: its own CPUs (and thread count), or its own CUDA device."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from surge.config import EngineConfig, ReplicaConfig


class PlacementError(ValueError):
    """The replicas asked for can't be placed (more than CPUs or devices); a clear message."""


def split_evenly(cpus: Sequence[int], parts: int) -> list[tuple[int, ...]]:
    """`cpus` in `parts` contiguous shares whose sizes differ by at most one."""
    if parts > len(cpus):
        raise PlacementError(
            f"{parts} replicas need at least {parts} CPUs; this process may use {len(cpus)} "
            f"({', '.join(map(str, cpus))}). Use fewer replicas, or let replicas share CPUs "
            "(--no-replica-pinning)"
        )
    base, extra = divmod(len(cpus), parts)
    shares, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        shares.append(tuple(cpus[start : start + size]))
        start += size
    return shares


def available_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask, which containers narrow)."""
    return sorted(os.sched_getaffinity(0))


def cuda_devices(config: ReplicaConfig) -> list[str]:
    """The devices CUDA replicas use: the configured ones, else every visible one."""
    if config.devices:
        return [d if d.startswith("cuda") else f"cuda:{d}" for d in config.devices]
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def check_replicas(base: EngineConfig, config: ReplicaConfig, replicas: int) -> None:
    """Raise PlacementError unless `replicas` replicas can be placed."""
    replica_config(base, config, replicas - 1, replicas)


def replica_config(
    base: EngineConfig,
    config: ReplicaConfig,
    index: int,
    total: int,
    cpus: Sequence[int] | None = None,
) -> EngineConfig:
    """The engine config of replica `index` of `total`: its CPUs and threads, or its device."""
    if base.device.startswith("cuda"):
        devices = cuda_devices(config)
        if total > len(devices):
            raise PlacementError(
                f"{total} replicas on CUDA need {total} devices (one each); "
                f"{len(devices)} available: {', '.join(devices) or 'none'}"
            )
        return dataclasses.replace(base, device=devices[index])
    if not config.pin_cpus:
        return base
    share = split_evenly(available_cpus() if cpus is None else cpus, total)[index]
    threads = len(share) if base.num_threads is None else min(base.num_threads, len(share))
    return dataclasses.replace(base, cpu_affinity=share, num_threads=threads)


def apply_cpu_affinity(config: EngineConfig) -> None:
    """Pin this process to the config's CPUs (called in the core process before it loads)."""
    if config.cpu_affinity:
        os.sched_setaffinity(0, config.cpu_affinity)
