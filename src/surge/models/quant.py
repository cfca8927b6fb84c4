"""Quantized weights kept in GGUF's block formats, for the CPU kernels' quantized linear.

A GGUF file's Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K matrices are kept as the file stores them
(rows of blocks), never dequantized: the kernel reads those bytes (surge/kernels/quant_kernels.cpp).
`--quantization int8|int4` turns an HF checkpoint's linear weights into the same formats at load
(Q8_0: int8 codes with one scale per 32 weights of a row; Q4_1: 4-bit codes with a scale and a
minimum per 32), quantized by the `gguf` library's own reference code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# GGUF (ggml) type id -> (name, weights per block, bytes per block); the formats the kernel reads
KERNEL_QTYPES: dict[int, tuple[str, int, int]] = {
    8: ("Q8_0", 32, 34),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
# The 32-weight formats are repacked at load into 64-weight chunks the kernel decodes in a few
# instructions: [f16 d0 d1 (m0 m1)][codes], the 4-bit codes of weights i and 32 + i sharing byte
# i, the 8-bit ones stored + 128. Same bytes as the file for Q4_1 and Q8_0; Q4_0 gains its
# offsets (m = -8 d), 40 bytes per 64 weights instead of 36. K-quants are read as stored.
_CHUNK_BYTES = {2: 40, 3: 40, 8: 68}
QUANTIZATION_METHODS = ("auto", "gguf", "none", "int8", "int4")
# --quantization auto keeps a GGUF quantized when its bf16 copy would take at least this much.
# Below it the bf16 copy is cheap and serves more: bf16 runs on AMX/AVX-512 BF16 tiles while the
# quantized kernel's int8 dot products are compute-bound from batch ~8 (BENCHMARKS.md: the
# bundled 135M model, 92 MiB as Q4_1 or 270 MB as bf16, serves 3.7x more tokens/s at 32 users in
# bf16); above it memory decides, and a 7B model's 14 GiB bf16 copy would not even fit.
KEEP_QUANTIZED_MIN_BYTES = 2 * 1024**3


def gguf_stays_quantized(method: str, bf16_bytes: int) -> bool:
    """Whether --quantization `method` keeps a (bf16-model) GGUF quantized, given its bf16 size."""
    return method == "gguf" or (method == "auto" and bf16_bytes >= KEEP_QUANTIZED_MIN_BYTES)


_METHOD_QTYPE = {"int8": 8, "int4": 3}  # --quantization -> GGUF type quantized at load


@dataclass(slots=True)
class QuantizedTensor:
    """A [rows, cols] matrix of a GGUF block format in the kernel's layout: `data` is uint8
    [rows, row_bytes(qtype, cols)]. Build it with `from_gguf` from the file's bytes."""

    qtype: int
    data: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_gguf(cls, qtype: int, blocks: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
        """From GGUF's bytes [rows, file bytes per row] (repacked where the format needs it)."""
        data = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(shape[0], -1)
        if qtype in _CHUNK_BYTES:
            data = _to_chunks(qtype, data)
        return cls(qtype, torch.from_numpy(data), (int(shape[0]), int(shape[1])))

    def gguf_bytes(self) -> np.ndarray:
        """The matrix as GGUF stores it, [rows, file bytes per row]."""
        data = self.data.numpy()
        return _from_chunks(self.qtype, data) if self.qtype in _CHUNK_BYTES else data

    @property
    def type_name(self) -> str:
        """'Q4_K' etc."""
        return KERNEL_QTYPES[self.qtype][0]

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols], by the gguf library (the reference for the kernel)."""
        from gguf.quants import dequantize

        array = dequantize(self.gguf_bytes(), self.qtype)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(self.shape)

    def permute_rows(self, order: torch.Tensor) -> QuantizedTensor:
        """The rows reordered (rows are independent blocks, so this moves bytes only)."""
        return QuantizedTensor(self.qtype, self.data[order].contiguous(), self.shape)


def row_bytes(qtype: int, cols: int) -> int:
    """Bytes of one row of `cols` weights; 0 where the kernel can't take this type or width.

    The kernel reads 64 weights at a time: cols must be a multiple of 64 (and of 256 for the
    K-quants, whose blocks are that long).
    """
    if qtype not in KERNEL_QTYPES or cols % 64:
        return 0
    if qtype in _CHUNK_BYTES:
        return cols // 64 * _CHUNK_BYTES[qtype]
    _, block, size = KERNEL_QTYPES[qtype]
    return 0 if cols % block else cols // block * size


def _halves(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The f16 at `offset` of every block, as float16 [rows, blocks]."""
    return np.ascontiguousarray(blocks[:, :, offset : offset + 2]).view(np.float16)[..., 0]


def _to_chunks(qtype: int, data: np.ndarray) -> np.ndarray:
    """GGUF's 32-weight blocks [rows, bytes] -> the kernel's 64-weight chunks."""
    rows = data.shape[0]
    size = KERNEL_QTYPES[qtype][2]
    blocks = data.reshape(rows, -1, size)  # [rows, 2 * chunks, size]
    d = _halves(blocks, 0).reshape(rows, -1, 2)
    if qtype == 8:
        codes = (blocks[:, :, 2:] ^ 0x80).reshape(rows, -1, 64)
        scales = d.view(np.uint8).reshape(rows, -1, 4)
        return np.concatenate([scales, codes], axis=2).reshape(rows, -1)
    m = (d * np.float16(-8)) if qtype == 2 else _halves(blocks, 2).reshape(rows, -1, 2)
    qs = blocks[:, :, 2 if qtype == 2 else 4 :]  # 16 bytes: weights j (low), 16 + j (high)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(rows, -1, 2, 32)
    packed = codes[:, :, 0] | (codes[:, :, 1] << 4)  # byte i: weight i low, 32 + i high
    scales = np.concatenate([d, m], axis=2).astype(np.float16).view(np.uint8)
    return np.concatenate([scales, packed], axis=2).reshape(rows, -1)


def _from_chunks(qtype: int, data: np.ndarray) -> np.ndarray:
    """The inverse of `_to_chunks` (Q4_0 drops the offsets it gained)."""
    rows = data.shape[0]
    chunks = data.reshape(rows, -1, _CHUNK_BYTES[qtype])
    if qtype == 8:
        d = chunks[:, :, :4].reshape(rows, -1, 2, 2)
        codes = (chunks[:, :, 4:] ^ 0x80).reshape(rows, -1, 2, 32)
        return np.concatenate([d, codes], axis=3).reshape(rows, -1)
    d = chunks[:, :, 0:4].reshape(rows, -1, 2, 2)
    m = chunks[:, :, 4:8].reshape(rows, -1, 2, 2)
    packed = chunks[:, :, 8:]
    codes = np.stack([packed & 0x0F, packed >> 4], axis=2)  # [rows, chunks, block, 32]
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    parts = [d, qs] if qtype == 2 else [d, m, qs]
    return np.concatenate(parts, axis=3).reshape(rows, -1)


def kernel_can_take(qtype: int, shape: tuple[int, ...]) -> bool:
    """Whether the quantized linear can run a matrix of this GGUF type and HF shape."""
    return len(shape) == 2 and row_bytes(qtype, shape[1]) > 0


def quantize(weight: torch.Tensor, method: str) -> QuantizedTensor | None:
    """The weight [rows, cols] in `method`'s format (int8: Q8_0, int4: Q4_1); None if it can't be."""
    qtype = _METHOD_QTYPE[method]
    if not kernel_can_take(qtype, tuple(weight.shape)):
        return None
    from gguf.quants import quantize as gguf_quantize

    data = gguf_quantize(weight.detach().float().numpy(), qtype)
    return QuantizedTensor.from_gguf(qtype, data, (weight.shape[0], weight.shape[1]))


def check_method(method: str) -> str:
    """The --quantization value, validated."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, not {method!r}")
    return method


def weights_summary(model: torch.nn.Module) -> str:
    """'Q4_1 x 210, Q8_0 x 1 (58 MiB)' for a model's quantized matrices, or 'unquantized'."""
    counts: dict[str, int] = {}
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        tensors = [w for _, w in getattr(module, "quant_segments", None) or []]
        if getattr(module, "quant", None) is not None:
            tensors.append(module.quant)
        for weight in tensors:
            if weight.data.data_ptr() in seen:  # a tied table counts once
                continue
            seen.add(weight.data.data_ptr())
            counts[weight.type_name] = counts.get(weight.type_name, 0) + 1
            total += weight.data.numel()
    if not counts:
        return "unquantized"
    kinds = ", ".join(f"{name} x {n}" for name, n in sorted(counts.items()))
    return f"{kinds} ({total / 2**20:.0f} MiB)"


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim), so RSS shows what is held."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass
