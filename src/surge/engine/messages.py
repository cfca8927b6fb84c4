"""The engine core's message types (msgspec structs): add, abort/finish, outputs, ready, shutdown."""

from __future__ import annotations

import msgspec

from surge.engine.request import SamplingParams


class EngineCoreRequest(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """Add one sequence to the core (n > 1 is fanned out before this)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0
    # tokens it already generated elsewhere (a replica failed): the core resumes after them, as
    # after a preemption, so max_tokens, penalties and a seeded sampler continue where they were
    output_token_ids: list[int] = []


class EngineCoreFinish(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """Finish sequences early: an abort (client gone), or a stop string found by the front end."""

    req_ids: list[str]
    reason: str = "abort"  # "abort" or "stop"


class EngineCoreOutput(msgspec.Struct, frozen=True, array_like=True):
    """What one step did to one sequence."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: int | None = None  # the stop token id that ended it, if any
    error: str | None = None
    num_cached_tokens: int = 0


class EngineCoreOutputs(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """All of one step's outputs plus the core's load, for metrics and balancing."""

    outputs: list[EngineCoreOutput]
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, cumulative
    prefix_cache_hits: int = 0  # of those, tokens found, cumulative
    first_scheduled_req_ids: list[str] = []  # sequences that left the queue this step
    num_requests_received: int = 0  # requests added since the core started, cumulative
    num_waiting_tokens: int = 0  # tokens still to compute of sequences not running yet
    # sequences a remote transport lost with the host that ran them (surge.serving): the front
    # end resends them with the tokens they produced, routed anew, as after a replica failure
    lost_req_ids: list[str] = []
    lost_reason: str = ""


class EngineCoreReady(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """The core loaded its model and accepts requests: the EngineLimits it found."""

    num_kv_blocks: int
    block_size: int
    max_model_len: int
    eos_token_ids: list[int]
    vocab_size: int


class EngineCoreShutdown(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """Ask the core process to exit its loop and close its sockets."""


# What travels on each socket: tagged, so one decoder tells the kinds apart.
CoreInput = EngineCoreRequest | EngineCoreFinish | EngineCoreShutdown
CoreOutput = EngineCoreOutputs | EngineCoreReady
