"""What /health and the admin routes say about a chat model's engine and its replicas."""

from __future__ import annotations

from surge.engine.async_engine import AsyncEngine


def engine_health(engine: AsyncEngine) -> dict[str, object]:
    """One chat model's restarts, failovers and replicas for /health."""
    return {
        "restarts": engine.num_restarts,
        "last_failure": engine.last_failure,
        "failovers": engine.num_failovers,
        "replicas": [
            {
                "replica": index,
                "state": r.state.value,
                "pid": r.pid,
                "restarts": r.num_restarts,
                "last_failure": r.last_failure,
                "cpus": list(r.config.cpu_affinity) if r.config.cpu_affinity else None,
                "device": r.config.device,
                "running": r.stats.num_running,
                "waiting": r.stats.num_waiting,
            }
            for index, r in sorted(engine.replicas.items())
        ],
    }
