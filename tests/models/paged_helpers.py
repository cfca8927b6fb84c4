"""Tiny HF configs per architecture, and a minimal paged runner to drive our models in tests."""

from __future__ import annotations

import pytest
import torch
import transformers

from surge.kernels import load_cpu_kernels
from surge.models.attention import allocate_kv_caches, build_attention_metadata
from surge.models.registry import create_model
from tests.tiny_models import TINY_DIMS

BACKENDS = ["torch", "kernels"]
VOCAB = 256
BASE = dict(
    vocab_size=VOCAB,
    **TINY_DIMS,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,  # HF's 0.02 gives near-flat logits and greedy output that repeats one token
)
# each case also exercises one config feature: rope scaling, tying, explicit head_dim, biases
CASES: dict[str, tuple[str, dict]] = {
    "llama": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "mistral": ("MistralConfig", dict(head_dim=32)),
    "qwen2": (
        "Qwen2Config",
        dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    ),
    "qwen3": ("Qwen3Config", dict(head_dim=32, attention_bias=True)),
    "glm": ("GlmConfig", dict(head_dim=16)),
    "glm4": (
        "Glm4Config",
        dict(
            head_dim=32,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                partial_rotary_factor=0.5,
                factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
}


def hf_config(case: str) -> transformers.PretrainedConfig:
    """The tiny HF config of one case."""
    cls_name, extra = CASES[case]
    return getattr(transformers, cls_name)(**BASE, **extra)


def load_pair(
    case: str, dtype: torch.dtype = torch.float32, seed: int = 0, backend: str = "torch"
) -> tuple[transformers.PreTrainedModel, torch.nn.Module]:
    """(HF model, our model with the HF weights on the given backend), both in eval mode."""
    config = hf_config(case)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    ours = create_model(config, dtype, "cpu")
    ours.load_weights(hf.state_dict().items())
    use_backend(ours, backend)
    return hf, ours


def use_backend(model: torch.nn.Module, backend: str) -> None:
    """Switch a model to the pure-torch path or the fused CPU kernels (skips if unbuildable).

    "kernels" also packs the bf16 linears for the kernels' own linear, as the engine does (where
    the CPU has it), so call it once per model. "torch" leaves them unpacked: oneDNN's packing
    is bit-identical to F.linear (test_packing.py).
    """
    kernels = None
    if backend == "kernels":
        kernels = load_cpu_kernels()
        if kernels is None:
            pytest.skip("no C++ compiler: CPU kernels not built")
        model.pack_weights(kernels)
    assert model.use_cpu_kernels(kernels) == (backend == "kernels")


def random_prompt(n: int, seed: int) -> list[int]:
    """n token ids in [3, VOCAB), avoiding pad/bos/eos."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


class PagedRunner:
    """Drives a model step by step like the engine: block tables, slot mapping, one flat batch."""

    def __init__(self, model: torch.nn.Module, num_blocks: int = 64, block_size: int = 4) -> None:
        self.model = model
        self.block_size = block_size
        dtype = next(model.parameters()).dtype
        self.kv_caches = allocate_kv_caches(model, num_blocks, block_size, dtype, "cpu")
        # shuffled so block tables are scattered, as after real allocation and frees
        g = torch.Generator().manual_seed(1)
        self.free = torch.randperm(num_blocks, generator=g).tolist()
        self.tables: dict[int, list[int]] = {}
        self.num_tokens: dict[int, int] = {}

    @torch.inference_mode()
    def step(self, batch: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Run [(seq_id, new token ids)] as one flat batch; logits [len(new), vocab] per seq."""
        ids, positions, query_lens, context_lens, tables = [], [], [], [], []
        for seq_id, new in batch:
            start = self.num_tokens.get(seq_id, 0)
            table = self.tables.setdefault(seq_id, [])
            while len(table) * self.block_size < start + len(new):
                table.append(self.free.pop())
            self.num_tokens[seq_id] = start + len(new)
            ids += new
            positions += range(start, start + len(new))
            query_lens.append(len(new))
            context_lens.append(start + len(new))
            tables.append(table)
        meta = build_attention_metadata(query_lens, context_lens, tables, self.block_size)
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.kv_caches, meta)
        return list(self.model.compute_logits(hidden).split(query_lens))

    def greedy(self, seq_id: int, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Prefill the prompt, then decode one token per step; returns the new tokens."""
        logits = self.step([(seq_id, prompt)])[0]
        out = [int(logits[-1].argmax())]
        while len(out) < max_new_tokens:
            out.append(int(self.step([(seq_id, out[-1:])])[0][-1].argmax()))
        return out
