"""How the service starts each kind of model for the registry, and the handles it gets back.

Chat models run on surge's engine (an AsyncEngine with its core in its own process); embedding
and rerank models run in an encoder worker process (sentence-transformers, dynamic batching).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from surge.config import EngineConfig, ReplicaConfig, SupervisorConfig
from surge.encoders import (
    DEFAULT_EMBEDDING_MODEL_NAME,
    EncoderClient,
    EncoderConfig,
    pull_default_embedding_model,
)
from surge.engine.async_engine import AsyncEngine, model_name
from surge.models.default_model import DEFAULT_MODEL_NAME
from surge.router import ModelHandle, ModelKind, ModelSpec, Starter

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ChatHandle:
    """A loaded chat model: its engine (which restarts its own core after a crash)."""

    engine: AsyncEngine

    @property
    def num_in_flight(self) -> int:
        return self.engine.num_unfinished

    def is_alive(self) -> bool:
        # The engine restarts its own core, and once its breaker opens it stays down on purpose
        # (/health says why) until an admin unloads and reloads it: never "dead" to the registry.
        return True

    async def close(self) -> None:
        await self.engine.shutdown()


@dataclass(frozen=True)
class ServedModels:
    """The models one service knows, which of them load at start-up, and the memory budget."""

    specs: tuple[ModelSpec, ...]
    startup: tuple[str, ...]  # loaded at start; /ready waits for them
    memory_budget: int | None = None  # bytes; None = no budget


@dataclass(frozen=True)
class StarterConfig:
    """What every model start shares: the CLI's engine options and supervision."""

    engine: EngineConfig
    supervisor: SupervisorConfig
    encoder_threads: int | None = None  # None = one thread (see ENCODER_NICE)
    replicas: ReplicaConfig = dataclasses.field(default_factory=ReplicaConfig)


# Encoder workers run niced, on one thread unless told otherwise: beside a chat engine that
# uses every core, more threads only oversubscribe them, and ingestion must not starve chat.
ENCODER_NICE = 10


def default_served_models(engine_config: EngineConfig) -> ServedModels:
    """One chat model (the config's, else the bundled one), loaded at start and pinned."""
    path = engine_config.model or DEFAULT_MODEL_NAME
    name = DEFAULT_MODEL_NAME if path == DEFAULT_MODEL_NAME else model_name(path)
    spec = ModelSpec(name, path, ModelKind.CHAT, keep_alive=None, pinned=True)
    return ServedModels((spec,), (name,))


def make_starter(config: StarterConfig) -> Starter:
    """The registry's starter: a ModelSpec -> a running model."""

    async def start(spec: ModelSpec) -> ModelHandle:
        if spec.kind is ModelKind.CHAT:
            engine_config = spec.engine_config(config.engine)
            if engine_config.model == DEFAULT_MODEL_NAME:
                engine_config = dataclasses.replace(engine_config, model=None)
            engine = await AsyncEngine.create(
                engine_config,
                multiprocess=True,
                supervisor=config.supervisor,
                replicas=dataclasses.replace(config.replicas, replicas=spec.replicas),
            )
            engine.model_name = spec.name
            logger.info(
                "chat model %s ready: %d replicas, max_model_len %d, KV cache %d tokens each",
                spec.name,
                len(engine.replicas),
                engine.limits.max_model_len,
                engine.limits.kv_capacity_tokens,
            )
            return ChatHandle(engine)
        path = Path(spec.path)
        if spec.path == DEFAULT_EMBEDDING_MODEL_NAME:
            path = pull_default_embedding_model()
        client = await EncoderClient.start(
            EncoderConfig(
                path,
                kind=spec.kind.value,  # type: ignore[arg-type]
                name=spec.name,
                num_threads=config.encoder_threads or 1,
                nice=ENCODER_NICE,
            )
        )
        logger.info("%s model %s ready", spec.kind.value, spec.name)
        return client

    return start
