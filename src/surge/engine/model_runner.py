"""Loads the model and KV cache, turns a SchedulerOutput into one flat batch, runs it, samples."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from surge.config import EngineConfig, EngineLimits
from surge.engine.kv_sizing import kv_bytes_per_block, num_blocks_for_memory
from surge.engine.request import Request
from surge.engine.sampler import Sampler, SamplingRow
from surge.engine.scheduler import SchedulerOutput
from surge.kernels import load_cpu_kernels
from surge.models.attention import allocate_kv_caches, build_attention_metadata
from surge.models.loader import ModelFiles, iter_weights, resolve_quantization
from surge.models.quant import release_freed_memory, weights_summary
from surge.models.registry import create_model

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """ "auto" = bfloat16 where the hardware runs it natively, else float32."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (
        torch.bfloat16
        if torch.backends.mkldnn.is_available() and _cpu_has_bf16()
        else torch.float32
    )


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(slots=True)
class StepResult:
    """Sampled tokens of one step, keyed by request id."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]]


class ModelRunner:
    """Owns the model, its KV cache and the per-request sampling generators."""

    def __init__(
        self, config: EngineConfig, files: ModelFiles, eos_token_ids: tuple[int, ...]
    ) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.dtype = resolve_dtype(config.dtype, self.device)
        start = time.monotonic()
        self.model = create_model(files.hf_config, self.dtype, self.device)
        kernels = load_cpu_kernels() if config.cpu_kernels and self.device.type == "cpu" else None
        self.quantization = resolve_quantization(
            config.quantization, files, self.dtype, kernels is not None
        )
        self.model.load_weights(iter_weights(files, self.dtype, self.quantization))
        num_packed = self.model.pack_weights(kernels)
        release_freed_memory()  # the float copies quantized weights replaced
        self.uses_cpu_kernels = self.model.use_cpu_kernels(kernels)
        self.model.eval()
        num_blocks = config.num_kv_blocks or self._blocks_for_memory(config.kv_cache_memory)
        self.kv_caches = allocate_kv_caches(
            self.model, num_blocks, config.block_size, self.dtype, self.device
        )
        why_not = self.model.prepare_decode_step(
            kernels if self.uses_cpu_kernels else None, self.kv_caches
        )
        logger.info("decode steps: %s", "one C call" if why_not is None else f"Python ({why_not})")
        max_model_len = min(config.max_model_len or files.max_model_len, files.max_model_len)
        self.limits = EngineLimits(
            num_kv_blocks=num_blocks,
            block_size=config.block_size,
            max_model_len=max_model_len,
            eos_token_ids=eos_token_ids,
            vocab_size=int(self.model.vocab_size),
        )
        self.sampler = Sampler(kernels.argmax if kernels is not None else None)
        self._generators: dict[str, torch.Generator] = {}
        logger.info(
            "loaded %s (%s, weights %s, %d linears pre-packed, CPU kernels %s) in %.1fs: %d KV blocks of %d tokens (%d tokens, %.0f MiB), max_model_len %d",
            files.path.name,
            self.dtype,
            weights_summary(self.model),
            num_packed,
            "on" if self.uses_cpu_kernels else "off",
            time.monotonic() - start,
            num_blocks,
            config.block_size,
            num_blocks * config.block_size,
            self._bytes_per_block() * num_blocks / 2**20,
            max_model_len,
        )

    def _bytes_per_block(self) -> int:
        m = self.model
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return kv_bytes_per_block(
            m.num_layers, m.num_kv_heads, m.head_dim, elem, self.config.block_size
        )

    def _blocks_for_memory(self, num_bytes: int) -> int:
        return num_blocks_for_memory(num_bytes, self._bytes_per_block())

    @property
    def vocab_size(self) -> int:
        return int(self.model.vocab_size)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run one step's flat batch (decodes first, as the scheduler orders it) and sample."""
        for req_id in out.finished_req_ids:
            self._generators.pop(req_id, None)
        if not out.seqs:
            return StepResult({}, {})
        # the only loop over the batch per step: gather ids, positions and the attention layout
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens, context_lens, block_tables, sample_index = [], [], [], []
        rows: list[SamplingRow] = []
        sample_req_ids: list[str] = []
        offset = 0
        for seq in out.seqs:
            req, start, n = seq.request, seq.num_computed_tokens, seq.num_new_tokens
            input_ids.extend(req.token_ids_slice(start, start + n))
            positions.extend(range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            block_tables.append(seq.block_ids)
            offset += n
            if seq.sample:
                sample_index.append(offset - 1)
                sample_req_ids.append(req.req_id)
                rows.append(self._sampling_row(req))
        meta = build_attention_metadata(
            query_lens,
            context_lens,
            block_tables,
            self.config.block_size,
            self.device,
            decode_gather=not self.uses_cpu_kernels,
            # the fused path attends prefill rows with its decode kernel: exact whatever the
            # chunking or the batch, and resumed or recomputed tokens equal their decodes
            rows_by_decode_kernel=self.uses_cpu_kernels,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        if not rows:
            return StepResult({}, {})
        logits = self.model.compute_logits(hidden[torch.tensor(sample_index, device=self.device)])
        sampled = self.sampler(logits, rows)
        logprobs = {
            rid: lp
            for rid, lp in zip(sample_req_ids, sampled.logprobs, strict=True)
            if lp is not None
        }
        return StepResult(dict(zip(sample_req_ids, sampled.token_ids, strict=True)), logprobs)

    def _sampling_row(self, req: Request) -> SamplingRow:
        params = req.sampling_params
        gen = None
        if params.seed is not None and not params.is_greedy:
            gen = self._generators.get(req.req_id)
            if gen is None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed)
                # a sequence resumed from another replica: skip the draws its tokens took there
                # (one per sampled token), so it goes on with the same random stream
                for _ in range(req.num_output_tokens):
                    torch.rand(1, generator=gen, device=gen.device)
                self._generators[req.req_id] = gen
        return SamplingRow(params, req.prompt_token_ids, req.output_token_ids, gen)
