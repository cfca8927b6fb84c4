"""GLM-4 (THUDM/zai-org): the Llama decoder with interleaved partial rotary and q/k/v biases.

HF checkpoints already fuse gate/up (`mlp.gate_up_proj`), which loads into our fused MLP as is.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from surge.models.llama import DecoderOptions, LlamaForCausalLM


class GlmForCausalLM(LlamaForCausalLM):
    """GLM-4 (`GlmForCausalLM`, e.g. glm-4-9b-chat-hf)."""

    @classmethod
    def options(cls, hf_config: PretrainedConfig) -> DecoderOptions:
        bias = bool(getattr(hf_config, "attention_bias", True))
        return DecoderOptions(qkv_bias=bias, interleaved_rope=True)


class Glm4ForCausalLM(GlmForCausalLM):
    """GLM-4-0414 (`Glm4ForCausalLM`): adds norms on the attention and MLP outputs."""

    @classmethod
    def options(cls, hf_config: PretrainedConfig) -> DecoderOptions:
        bias = bool(getattr(hf_config, "attention_bias", True))
        return DecoderOptions(qkv_bias=bias, interleaved_rope=True, sandwich_norm=True)
