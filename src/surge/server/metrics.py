"""Prometheus metrics, one CollectorRegistry per app; names mirror vLLM's with the prefix surge:."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from surge.encoders import EncoderClient
    from surge.engine.async_engine import AsyncEngine

_TTFT_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
_E2E_BUCKETS = (
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


class _EngineStatsCollector(Collector):
    """Reads each loaded chat model's replicas at scrape time, so the gauges are never stale."""

    def __init__(self, get_engines: Callable[[], dict[str, AsyncEngine]]) -> None:
        self._get_engines = get_engines

    def collect(self) -> Iterator[Metric]:
        per_replica = ["model", "replica"]
        families = {
            "restarts": CounterMetricFamily(
                "surge:engine_restarts",
                "Engine core restarts after a crash or stall.",
                labels=per_replica,
            ),
            "running": GaugeMetricFamily(
                "surge:num_requests_running", "Sequences running in the engine.", labels=per_replica
            ),
            "waiting": GaugeMetricFamily(
                "surge:num_requests_waiting", "Sequences waiting in the engine.", labels=per_replica
            ),
            "usage": GaugeMetricFamily(
                "surge:kv_cache_usage_perc", "KV cache usage, 0..1.", labels=per_replica
            ),
            "preemptions": CounterMetricFamily(
                "surge:num_preemptions", "Preemptions since start.", labels=per_replica
            ),
            "queries": CounterMetricFamily(
                "surge:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                labels=per_replica,
            ),
            "hits": CounterMetricFamily(
                "surge:prefix_cache_hits", "Of those, tokens found cached.", labels=per_replica
            ),
            "ready": GaugeMetricFamily(
                "surge:replica_ready",
                "1 while the replica takes requests (alive, loaded, not draining).",
                labels=per_replica,
            ),
            "breaker": GaugeMetricFamily(
                "surge:replica_breaker_open",
                "1 once the replica crashed too often and is not restarted.",
                labels=per_replica,
            ),
        }
        failovers = CounterMetricFamily(
            "surge:request_failovers",
            "Sequences moved to another replica after theirs failed or was removed.",
            labels=["model"],
        )
        routed = CounterMetricFamily(
            "surge:router_decisions",
            "Requests routed, by replica and rule (affinity, least_loaded, guard).",
            labels=["model", "replica", "reason"],
        )
        for name, engine in sorted(self._get_engines().items()):
            for index, replica in sorted(engine.replicas.items()):
                rows = [(str(index), replica.stats, replica)]
                hosts = replica.host_stats()
                if hosts:  # Ray Serve: one row per engine host, labelled with its replica id
                    rows = [(host, s, None) for host, s in sorted(hosts.items())]
                for label, s, local in rows:
                    values = {
                        "restarts": local.num_restarts if local else 0,
                        "running": s.num_running,
                        "waiting": s.num_waiting,
                        "usage": s.kv_cache_usage,
                        "preemptions": s.num_preemptions_total,
                        "queries": s.prefix_cache_queries,
                        "hits": s.prefix_cache_hits,
                        "ready": int(local.is_routable) if local else 1,  # heard from lately
                        "breaker": int(local.breaker_open) if local else 0,
                    }
                    for key, family in families.items():
                        family.add_metric([name, label], values[key])
            failovers.add_metric([name], engine.num_failovers)
            for (index, why), count in sorted(engine.route_counts.items()):
                routed.add_metric([name, str(index), why], count)
        yield from families.values()
        yield failovers
        yield routed


class _EncoderStatsCollector(Collector):
    """Each loaded embedding/rerank worker's model calls: rows / batches = the mean batch size."""

    def __init__(self, get_encoders: Callable[[], dict[str, EncoderClient]]) -> None:
        self._get_encoders = get_encoders

    def collect(self) -> Iterator[Metric]:
        batches = CounterMetricFamily(
            "surge:encoder_batches", "Model calls of an encoder worker.", labels=["model"]
        )
        rows = CounterMetricFamily(
            "surge:encoder_rows", "Texts (rows) run in those calls.", labels=["model"]
        )
        for name, client in self._get_encoders().items():
            batches.add_metric([name], client.stats.num_batches)
            rows.add_metric([name], client.stats.num_rows)
        yield batches
        yield rows


class Metrics:
    """Every metric of one app; the server updates them as requests go."""

    def __init__(
        self,
        get_engines: Callable[[], dict[str, AsyncEngine]],
        get_encoders: Callable[[], dict[str, EncoderClient]] = dict,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(get_engines))
        self.registry.register(_EncoderStatsCollector(get_encoders))
        r = self.registry
        self.prompt_tokens = Counter(
            "surge:prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "surge:generation_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.request_success = Counter(
            "surge:request_success",
            "Finished requests by finish reason.",
            ["model", "finished_reason"],
            registry=r,
        )
        self.request_aborted = Counter(
            "surge:request_aborted",
            "Requests the server aborted: client stopped reading, deadline passed.",
            ["reason"],
            registry=r,
        )
        self.model_loads = Counter(
            "surge:model_loads", "Models loaded (at start-up or on demand).", ["model"], registry=r
        )
        self.request_rejected = Counter(
            "surge:request_rejected",
            "Requests refused before reaching the engine.",
            ["reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "surge:time_to_first_token_seconds",
            "Time to first token.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "surge:inter_token_latency_seconds",
            "Time between output tokens.",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "surge:e2e_request_latency_seconds",
            "Arrival to last token.",
            ["model"],
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "surge:request_queue_time_seconds",
            "Arrival to first scheduled (or first token when the engine doesn't say).",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
