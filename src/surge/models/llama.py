"""The Llama-style decoder (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3); GLM builds on it too.

Architectures differ only in `DecoderOptions` (biases, q/k norms, rotary style, extra norms), so
one decoder stack serves them all. Module names match HF's so checkpoints load by name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from surge.kernels.decode_step import DecodeShape, DecodeStep, SurgeLayer
from surge.models.attention import AttentionMetadata, fused_paged_attention, paged_attention
from surge.models.layers import (
    Embedding,
    GatedMLP,
    Linear,
    QKVLinear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    can_pack,
    load_hf_weights,
    pack_linears,
)

if TYPE_CHECKING:
    from surge.kernels import CpuKernels

logger = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DecoderOptions:
    """What sets one architecture apart from plain Llama."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rotary
    interleaved_rope: bool = False  # GLM: rotate (x0, x1) pairs, not halves
    sandwich_norm: bool = False  # GLM-4: norms after the attention and MLP outputs too


def head_dim_of(hf_config: PretrainedConfig) -> int:
    """Explicit head_dim when the config has one (Qwen3, Mistral), else hidden / heads."""
    return getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )


class Attention(nn.Module):
    """Fused-QKV attention over the paged KV cache."""

    kernels: CpuKernels | None = None  # set by the model when the CPU kernels apply

    def __init__(self, hf_config: PretrainedConfig, opts: DecoderOptions) -> None:
        super().__init__()
        hidden = hf_config.hidden_size
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(hf_config)
        self.scale = self.head_dim**-0.5
        self.interleaved = opts.interleaved_rope
        self.qkv_proj = QKVLinear(
            hidden, self.num_heads, self.num_kv_heads, self.head_dim, opts.qkv_bias
        )
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=opts.o_bias)
        if opts.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj.forward(x)
        if self.kernels is not None:
            if self.q_norm is not None:  # Qwen3: norm the heads before the kernel rotates them
                q, k, _ = qkv.split(self.qkv_proj.split_sizes, dim=-1)
                shape_q = (num_tokens, self.num_heads, self.head_dim)
                shape_k = (num_tokens, self.num_kv_heads, self.head_dim)
                q.copy_(self.q_norm.forward(q.view(shape_q)).view_as(q))
                k.copy_(self.k_norm.forward(k.view(shape_k)).view_as(k))
            out = fused_paged_attention(
                qkv,
                cos,
                sin,
                kv_cache[0],
                kv_cache[1],
                meta,
                self.num_heads,
                self.scale,
                self.interleaved,
                self.kernels,
            )
            return self.o_proj.forward(out)
        q, k, v = qkv.split(self.qkv_proj.split_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm.forward(q), self.k_norm.forward(k)
        q = apply_rotary(q, cos, sin, self.interleaved)
        k = apply_rotary(k, cos, sin, self.interleaved)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj.forward(out.view(num_tokens, -1))


class DecoderLayer(nn.Module):
    """Pre-norm block; with sandwich_norm, the outputs are normed again before the residual."""

    def __init__(self, hf_config: PretrainedConfig, opts: DecoderOptions) -> None:
        super().__init__()
        hidden, eps = hf_config.hidden_size, hf_config.rms_norm_eps
        self.self_attn = Attention(hf_config, opts)
        self.mlp = GatedMLP(
            hidden, hf_config.intermediate_size, hf_config.hidden_act, bias=opts.mlp_bias
        )
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        if opts.sandwich_norm:  # HF GLM-4 names
            self.post_self_attn_layernorm = RMSNorm(hidden, eps)
            self.post_mlp_layernorm = RMSNorm(hidden, eps)
        else:
            self.post_self_attn_layernorm = self.post_mlp_layernorm = None

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual): the residual stream so far and this block's output not yet added to it.

        Deferring each add into the next norm lets one fused kernel do add + norm.
        """
        if residual is None:
            residual, x = x, self.input_layernorm.forward(x)
        else:
            x, residual = self.input_layernorm.forward(x, residual)
        h = self.self_attn.forward(x, cos, sin, kv_cache, meta)
        if self.post_self_attn_layernorm is not None:
            h = self.post_self_attn_layernorm.forward(h)
        x, residual = self.post_attention_layernorm.forward(h, residual)
        h = self.mlp.forward(x)
        if self.post_mlp_layernorm is not None:
            h = self.post_mlp_layernorm.forward(h)
        return h, residual


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, hf_config: PretrainedConfig, opts: DecoderOptions) -> None:
        super().__init__()
        self.embed_tokens = Embedding(hf_config.vocab_size, hf_config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(hf_config, opts) for _ in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(hf_config, head_dim_of(hf_config), opts.interleaved_rope)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        decode_step: DecodeStep | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens.forward(input_ids)
        # once per step, not per layer; the kernels rotate in float32
        rope_dtype = torch.float32 if self.layers[0].self_attn.kernels is not None else x.dtype
        cos, sin = self.rotary_emb.cos_sin(positions, rope_dtype)
        if decode_step is not None and meta.num_decodes == x.shape[0]:
            return decode_step(x, cos, sin, meta)  # every layer in one C call, same bits
        residual = None
        # submodules' .forward directly, here and in the layers: nn.Module.__call__'s hook
        # handling costs microseconds a call, ~270 calls a step, and surge registers no hooks
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer.forward(x, residual, cos, sin, kv_cache, meta)
        return self.norm.forward(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM over a flat batch and a paged KV cache."""

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.num_layers = hf_config.num_hidden_layers
        self.num_kv_heads = (
            getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        )
        self.head_dim = head_dim_of(hf_config)
        self.vocab_size = hf_config.vocab_size
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self._warn_sliding_window(hf_config)
        self.model = DecoderModel(hf_config, self.options(hf_config))
        # tied: read the embedding directly, so no tie can be broken by to_empty or loading
        self.lm_head = (
            None
            if self.tie_word_embeddings
            else Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        )
        self.requires_grad_(False)
        self.decode_step: DecodeStep | None = None  # prepare_decode_step

    @classmethod
    def options(cls, hf_config: PretrainedConfig) -> DecoderOptions:
        """Llama: q/k/v/o biases follow `attention_bias`, MLP biases `mlp_bias`."""
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(
            qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(hf_config, "mlp_bias", False))
        )

    @staticmethod
    def _warn_sliding_window(hf_config: PretrainedConfig) -> None:
        # full attention everywhere: exact while the context stays within the window
        window = getattr(hf_config, "sliding_window", None)
        enabled = getattr(hf_config, "use_sliding_window", True)
        if window and enabled and window < getattr(hf_config, "max_position_embeddings", 0):
            logger.warning(
                "sliding_window=%d is ignored (full attention); outputs differ beyond it", window
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of the flat batch; writes the new K/V into kv_caches."""
        step = self.decode_step
        if step is not None and step.kv_caches is not kv_caches:
            step = None  # built over other caches (the runner's); these take the Python layers
        return self.model.forward(input_ids, positions, kv_caches, meta, step)

    def prepare_decode_step(
        self, kernels: CpuKernels | None, kv_caches: list[KVCache]
    ) -> str | None:
        """Run decode-only steps over these caches in one C call (surge/kernels/decode_step.cpp)
        where every part of the model fits it; None if so, else why not. SURGE_DECODE_STEP=0
        keeps the Python path (same results, for comparison)."""
        self.decode_step = None
        why_not = self._decode_step_unfit(kernels)
        if why_not is not None:
            return why_not
        assert kernels is not None
        decoder = self.model
        attn = decoder.layers[0].self_attn
        layers, keep = [], []
        for layer, (k_cache, v_cache) in zip(decoder.layers, kv_caches, strict=True):
            linears = (
                layer.self_attn.qkv_proj,
                layer.self_attn.o_proj,
                layer.mlp.gate_up_proj,
                layer.mlp.down_proj,
            )
            structs = [linear.decode_struct() for linear in linears]
            if any(s is None for s in structs):
                return "a linear on oneDNN or torch, or of over 4 quantized formats"
            keep.append(layer)
            layers.append(
                SurgeLayer(
                    layer.input_layernorm.weight.data_ptr(),
                    layer.post_attention_layernorm.weight.data_ptr(),
                    *structs,
                    k_cache.data_ptr(),
                    v_cache.data_ptr(),
                )
            )
        shape = DecodeShape(
            hidden=self.hf_config.hidden_size,
            intermediate=self.hf_config.intermediate_size,
            num_heads=attn.num_heads,
            num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            rotary_dim=decoder.rotary_emb.rotary_dim,
            interleaved=attn.interleaved,
            eps=decoder.norm.eps,
            scale=attn.scale,
        )
        self.decode_step = DecodeStep(
            kernels.decode_step_fns[decoder.norm.weight.dtype],
            shape,
            layers,
            decoder.norm.weight,
            kv_caches,
            keep,
        )
        return None

    def _decode_step_unfit(self, kernels: CpuKernels | None) -> str | None:
        """Why the C decode step can't run this model, or None."""
        if os.environ.get("SURGE_DECODE_STEP", "1") == "0":
            return "SURGE_DECODE_STEP=0"
        decoder = self.model
        layer = decoder.layers[0]
        if kernels is None or layer.self_attn.kernels is None:
            return "CPU kernels off"
        if decoder.norm.weight.dtype not in kernels.decode_step_fns:
            return f"{decoder.norm.weight.dtype} weights (bf16 or float32 only)"
        if layer.self_attn.q_norm is not None or layer.post_self_attn_layernorm is not None:
            return "q/k norms or sandwich norms"
        if not layer.mlp.is_silu:
            return "an activation other than SiLU"
        eps = {m.eps for m in self.modules() if isinstance(m, RMSNorm)}
        if len(eps) != 1:
            return "norms with different eps"
        return None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] for the selected hidden states."""
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head.forward_float(hidden)

    def pack_weights(self, kernels: CpuKernels | None = None) -> int:
        """Pre-pack the bf16 CPU linears for surge's kernels or oneDNN, or hand the quantized
        ones to the kernels; call after loading."""
        embed = self.model.embed_tokens
        if self.lm_head is None and embed.quant is not None:
            # tied and quantized: the logits read the same quantized table, no second copy
            self.lm_head = Linear(embed.embedding_dim, self.vocab_size, bias=False, device="meta")
            self.lm_head.load_quantized(embed.quant)
        embed.use_quantized(kernels)
        if self.lm_head is None and can_pack(embed.weight):
            # tied: a packed copy for the logits; the embedding keeps its own table for lookups
            # on meta: its own weight is replaced at once, so never allocate or initialise one
            self.lm_head = Linear(embed.embedding_dim, self.vocab_size, bias=False, device="meta")
            self.lm_head.weight = embed.weight
        return pack_linears(self, kernels)

    def use_cpu_kernels(self, kernels: CpuKernels | None) -> bool:
        """Route norms, rotary, attention and SiLU·mul through the fused CPU kernels if they fit."""
        dtype = self.model.norm.weight.dtype  # the model's (a quantized embedding has none)
        device = self.model.norm.weight.device
        if kernels is None or device.type != "cpu" or not kernels.supports(dtype, self.head_dim):
            kernels = None
        for module in self.modules():
            if isinstance(module, RMSNorm | GatedMLP | Attention):
                module.kernels = kernels
        return kernels is not None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (cast to the model dtype); raises on unknown or missing names."""
        skip = {"lm_head.weight"} if self.tie_word_embeddings else set()
        load_hf_weights(self, weights, skip=skip)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama with an explicit head_dim; its sliding window is ignored (warned)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: biases on q/k/v only."""

    @classmethod
    def options(cls, hf_config: PretrainedConfig) -> DecoderOptions:
        return DecoderOptions(qkv_bias=True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: RMSNorm on q and k per head, explicit head_dim, optional attention biases."""

    @classmethod
    def options(cls, hf_config: PretrainedConfig) -> DecoderOptions:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)
