"""surge as a Ray Serve application (`surge serve --ray`, or `build_app` from Python).

Three kinds of deployment:
- `EngineHost`, one per chat model: each replica runs one engine core (a CoreHost, its core
  in a child process that dies with it) and streams one sequence per call. Serve spreads the
  replicas over the cluster and autoscales them on the cores' own count of running + waiting
  sequences (`WorkPolicy`), not on Ray's count of ongoing calls.
- `EncoderHost`, one per embedding or rerank model: each replica runs one encoder worker (an
  EncoderClient, its worker in a child process) and answers embed / rerank / count_tokens calls,
  which the worker batches with whatever else that replica is running. Serve autoscales them on
  its own count of ongoing calls (`target_work` of them per replica).
- `Ingress`, the OpenAI API and the web app: the same FastAPI app as `surge serve`, whose chat
  engines are front ends (AsyncEngine) over RemoteCoreClients reaching the model's EngineHost
  deployment. Tokenizing, stop strings, admission, per-key limits, priorities, metrics and
  failover all stay in that one place, as on one machine; its embedding and rerank models are
  RemoteEncoderClients over their EncoderHost deployments.

Ray is the optional `surge[ray]` extra; nothing else in surge imports this module (or
surge.serving.encoder_host).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from surge.config import EngineConfig, ServerConfig, SupervisorConfig
from surge.engine.async_engine import AsyncEngine
from surge.models.default_model import DEFAULT_MODEL_NAME
from surge.models.loader import load_model_files
from surge.router import ModelHandle, ModelKind, ModelSpec, Starter
from surge.server.models import ChatHandle, ServedModels, StarterConfig, make_starter
from surge.serving.core_host import CoreHost
from surge.serving.encoder_host import EncoderHost, HandleEncoders
from surge.serving.remote_client import RemoteCoreClient
from surge.serving.remote_encoder import RemoteEncoderClient
from surge.serving.wire import HostChunk, decode_request, encode, encode_limits
from surge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

APP_NAME = "surge"
# The custom autoscaling metric each EngineHost replica reports.
WORK_METRIC = "surge_work"


@dataclass(frozen=True)
class RayScaling:
    """How each model's deployment scales (an encoder's Ray CPUs are its worker's threads)."""

    min_replicas: int = 1  # 0: scale to zero when idle (requests wait while one starts)
    max_replicas: int = 1
    initial_replicas: int | None = None
    # per replica, to aim for: running + waiting sequences (chat), ongoing calls (encoders)
    target_work: float = 16.0
    num_cpus: float = 1.0  # Ray CPUs per chat replica (its core's threads)
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    health_check_period_s: float = 5.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                f"{self.min_replicas}..{self.max_replicas}"
            )
        if self.target_work <= 0 or self.num_cpus <= 0:
            raise ValueError("target_work and num_cpus must be > 0")


class WorkPolicy:
    """Serve autoscaling on the engines' own work: replicas = ceil(work / target_work), where
    work is every replica's running + waiting sequences plus calls still queued at handles
    (Serve applies min/max and the up/down delays around this)."""

    def __init__(self, target_work: float) -> None:
        self.target_work = target_work

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        queued = ctx.total_queued_requests or 0.0
        if ctx.current_num_replicas == 0:  # scale from zero as soon as anything waits
            return (1 if ctx.total_num_requests > 0 or queued > 0 else 0), ctx.policy_state
        reported = (ctx.aggregated_metrics or {}).get(WORK_METRIC, {})
        work = sum(reported.values()) + queued
        # 0 when idle: Serve holds it at min_replicas, and waits downscale_to_zero_delay_s
        return math.ceil(work / self.target_work), ctx.policy_state


class EngineHost:
    """One engine core of a chat model, as a Serve replica."""

    async def __init__(self, config: EngineConfig, supervisor: SupervisorConfig) -> None:
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.host = CoreHost(config, supervisor, host_id=replica_id)
        await self.host.start()
        logger.info("engine host %s ready", replica_id)

    async def limits(self) -> bytes:
        """The core's EngineLimits (msgpack)."""
        return encode_limits(self.host.limits)

    async def generate(self, request: bytes) -> AsyncIterator[bytes]:
        """Run one sequence; each step as a HostChunk. A cancelled call aborts it in the core."""
        async for outputs in self.host.stream(decode_request(request)):
            yield encode(HostChunk(self.host.host_id, outputs))

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The autoscaling signal: this core's running + waiting sequences."""
        return {WORK_METRIC: float(self.host.work())}

    def counters(self) -> dict[str, int | str]:
        """This host's id, sequences in flight and aborted so far (for tests and debugging)."""
        return {
            "host": self.host.host_id,
            "work": self.host.work(),
            "aborted": self.host.num_aborted,
        }

    def check_health(self) -> None:
        """Unhealthy once the core crashed too often here: Serve replaces this replica."""
        if not self.host.healthy:
            raise RuntimeError(f"engine core failed: {self.host.replica.last_failure}")

    async def __del__(self) -> None:
        await self.host.stop()


class HandleHosts:
    """RemoteHosts over a Serve deployment handle (Serve picks the replica of each call)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def limits(self) -> bytes:
        return await self._handle.limits.remote()  # type: ignore[no-any-return]

    def stream(self, request: bytes) -> DeploymentResponseGenerator:
        return self._handle.options(stream=True).generate.remote(request)


def remote_starter(
    config: StarterConfig,
    handles: dict[str, DeploymentHandle],
    scaling: RayScaling,
    encoders: dict[str, DeploymentHandle] | None = None,
) -> Starter:
    """The registry's starter at the ingress: chat models with a deployment get a front end over
    it, encoder models with one a RemoteEncoderClient; anything else starts here as on one
    machine."""
    local = make_starter(config)
    encoders = encoders or {}

    async def start(spec: ModelSpec) -> ModelHandle:
        if spec.kind is not ModelKind.CHAT and spec.name in encoders:
            client = await RemoteEncoderClient.start(HandleEncoders(encoders[spec.name]))
            logger.info("%s model %s: over its Ray Serve deployment", spec.kind.value, spec.name)
            return client
        handle = handles.get(spec.name)
        if spec.kind is not ModelKind.CHAT or handle is None:
            return await local(spec)
        engine_config = host_engine_config(spec, config.engine, scaling)
        files = await asyncio.to_thread(load_model_files, engine_config.model)
        tokenizer = await asyncio.to_thread(Tokenizer.from_model_files, files)
        most = model_scaling(spec, scaling).max_replicas
        replicas = dataclasses.replace(config.replicas, replicas=1, hosts=most)
        engine = AsyncEngine(
            engine_config,
            tokenizer,
            multiprocess=False,
            supervisor=config.supervisor,
            client_factory=lambda _: RemoteCoreClient(HandleHosts(handle)),
            replicas=replicas,
        )
        await engine.start()  # waits for a host (one is started if the model scaled to zero)
        engine.model_name = spec.name
        logger.info("chat model %s: front end over its Ray Serve deployment", spec.name)
        return ChatHandle(engine)

    return start


def model_scaling(spec: ModelSpec, scaling: RayScaling) -> RayScaling:
    """A model's scaling: its own bounds from surge.toml (min_replicas, max_replicas) over the
    flags'; a bound it doesn't set follows the one it does."""
    high = spec.max_replicas
    low = spec.min_replicas
    if low is None:
        low = scaling.min_replicas if high is None else min(scaling.min_replicas, high)
    if high is None:
        high = max(scaling.max_replicas, low, 1)
    initial = scaling.initial_replicas
    if initial is not None:
        initial = min(max(initial, low), high)
    return dataclasses.replace(
        scaling, min_replicas=low, max_replicas=high, initial_replicas=initial
    )


def host_engine_config(spec: ModelSpec, base: EngineConfig, scaling: RayScaling) -> EngineConfig:
    """A model's engine config on a host: its threads are the CPUs Ray gives the replica."""
    config = spec.engine_config(base)
    if config.model == DEFAULT_MODEL_NAME:
        config = dataclasses.replace(config, model=None)
    threads = max(1, int(scaling.num_cpus))
    return dataclasses.replace(config, num_threads=threads, cpu_affinity=None)


@serve.ingress()
class Ingress:
    """The OpenAI API (and the web app) of `surge serve`, in front of the model deployments."""

    def __init__(
        self,
        engine_config: EngineConfig,
        server_config: ServerConfig,
        models: ServedModels,
        ui: Any,
        scaling: RayScaling,
        hosts: dict[str, DeploymentHandle],
        encoders: dict[str, DeploymentHandle],
    ) -> None:
        self._args = (engine_config, server_config, models, ui, scaling, hosts, encoders)

    def __serve_build_asgi_app__(self) -> Any:
        from surge.server.app import create_app

        engine_config, server_config, models, ui, scaling, hosts, encoders = self._args
        return create_app(
            engine_config,
            server_config,
            models,
            ui,
            starter_factory=lambda config: remote_starter(config, hosts, scaling, encoders),
        )


def build_app(
    engine_config: EngineConfig,
    server_config: ServerConfig,
    models: ServedModels,
    ui: Any = None,
    scaling: RayScaling | None = None,
) -> serve.Application:
    """The Serve application: one EngineHost deployment per chat model, one EncoderHost
    deployment per embedding or rerank model, and the ingress."""
    scaling = scaling or RayScaling()
    supervisor = server_config.supervisor
    encoder_threads = server_config.encoder_threads or 1
    hosts, encoders = {}, {}
    for spec in models.specs:
        own = model_scaling(spec, scaling)
        if spec.kind is ModelKind.CHAT:
            hosts[spec.name] = _engine_deployment(spec, engine_config, own).bind(
                host_engine_config(spec, engine_config, own), supervisor
            )
        else:
            deployment = _encoder_deployment(spec, own, encoder_threads)
            encoders[spec.name] = deployment.bind(spec, encoder_threads)
    ingress = serve.deployment(Ingress, name="ingress", ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine_config, server_config, models, ui, scaling, hosts, encoders)


def _engine_deployment(
    spec: ModelSpec, engine_config: EngineConfig, scaling: RayScaling
) -> serve.Deployment:
    """`engine-<name>`: autoscaled on its cores' own work (WorkPolicy)."""
    return serve.deployment(
        EngineHost,
        name=f"engine-{spec.name}",
        ray_actor_options={"num_cpus": scaling.num_cpus},
        max_ongoing_requests=max(64, 4 * spec.engine_config(engine_config).max_num_seqs),
        health_check_period_s=scaling.health_check_period_s,
        autoscaling_config=AutoscalingConfig(
            **_bounds(scaling),
            look_back_period_s=max(10.5, scaling.upscale_delay_s),
            policy=AutoscalingPolicy(
                policy_function=WorkPolicy,
                policy_kwargs={"target_work": scaling.target_work},
            ),
        ),
    )


def _encoder_deployment(spec: ModelSpec, scaling: RayScaling, num_threads: int) -> serve.Deployment:
    """`encoder-<name>`: Serve's own policy on ongoing calls, `target_work` per replica (each
    replica batches the calls it holds, so it takes many at once)."""
    return serve.deployment(
        EncoderHost,
        name=f"encoder-{spec.name}",
        ray_actor_options={"num_cpus": num_threads},
        max_ongoing_requests=max(64, 4 * math.ceil(scaling.target_work)),
        health_check_period_s=scaling.health_check_period_s,
        autoscaling_config=AutoscalingConfig(
            **_bounds(scaling), target_ongoing_requests=scaling.target_work
        ),
    )


def _bounds(scaling: RayScaling) -> dict[str, Any]:
    """The AutoscalingConfig fields every model deployment shares: its bounds and delays."""
    return {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "initial_replicas": scaling.initial_replicas,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
        "downscale_to_zero_delay_s": scaling.downscale_delay_s,
    }


def run(
    engine_config: EngineConfig,
    server_config: ServerConfig,
    models: ServedModels,
    ui: Any = None,
    scaling: RayScaling | None = None,
    address: str | None = None,
) -> int:
    """Join the cluster at `address` (else start a local one), serve until SIGTERM/SIGINT."""
    import ray

    ray.init(address=address, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": server_config.host, "port": server_config.port})
    serve.run(build_app(engine_config, server_config, models, ui, scaling), name=APP_NAME)
    logger.info("surge on Ray Serve: http://%s:%d", server_config.host, server_config.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
