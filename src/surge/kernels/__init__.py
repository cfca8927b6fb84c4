"""Fused CPU kernels, compiled from `cpu_kernels.cpp`, `quant_kernels.cpp` and `decode_step.cpp`
(a whole decode step in one call) on first use, called through ctypes.

The source is plain C++ (no torch headers), so a build takes seconds; the shared library is
cached under ~/.cache/surge/kernels ($SURGE_KERNEL_CACHE), keyed by the source, the compiler and
the CPU (it is built with -march=native). Where no C++ compiler works, `load_cpu_kernels`
returns None and the models keep their pure-torch path. SURGE_CPU_KERNELS=0 turns them off.

The bf16 linear has two implementations over one packed layout: AMX tiles and AVX-512 BF16 dot
products. They round differently (AMX keeps more precision inside a tile's dot product), so the
choice is made once per process, from the CPU, never per batch size: a row's result must not
depend on its batch. AMX is chosen only after a probe in a child process proved it runs here
(`choose_linear_isa`); SURGE_CPU_LINEAR=avx512 forces the AVX-512 kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from surge.kernels import decode_step

if TYPE_CHECKING:
    from surge.models.quant import QuantizedTensor

logger = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name(n) for n in ("cpu_kernels.cpp", "quant_kernels.cpp", "decode_step.cpp")
)
HEADERS = (Path(__file__).with_name("common.h"),)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
SUPPORTED_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}
LINEAR_COLS = 32  # output columns per block of a packed linear weight (kLinearCols)
AMX_DEPTH = 32  # the AMX linear takes K in steps of one tile's depth (kAmxDepth)
AMX_BF16 = "amx-bf16"
AVX512_BF16 = "avx512-bf16"
LINEAR_ISAS = (AMX_BF16, AVX512_BF16)
# the quantized linear compiled in, by surge_qlinear_isa(): the first two quantize x to int8
QLINEAR_ISAS = ("portable", "avx2", "avx512-vnni")
_PROBE_FAILURES = {
    2: "Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)",
    3: "the AMX linear gave wrong results",
    4: "the library was not built with AMX (the compiler or CPU lacks AMX-BF16)",
}

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_C = ctypes.c_int
_SIGNATURES = {
    "decode_attention": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _F],
    "rms_norm": [_P, _P, _P, _P, _I, _I, _F],
    "rope_and_cache": [_P, _I, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_int],
    "silu_and_mul": [_P, _P, _I, _I],
}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(
    x: torch.Tensor, kernel: str, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)
) -> torch.Tensor:
    """x [..., K] as [rows, K] with unit stride along K (rows may be strided), of `dtypes` only."""
    if x.dtype not in dtypes:
        raise TypeError(f"the {kernel} kernel got {x.dtype} input")
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class CpuKernels:
    """Typed entry points of the compiled library; tensors must be contiguous CPU bf16/fp32.

    linear_isa: the bf16 linear's implementation, AMX_BF16 (only where the probe passed) or
    AVX512_BF16 (the default).
    """

    def __init__(self, lib: ctypes.CDLL, linear_isa: str = AVX512_BF16) -> None:
        if linear_isa not in LINEAR_ISAS:
            raise ValueError(f"linear_isa must be one of {LINEAR_ISAS}, not {linear_isa!r}")
        self._fns: dict[tuple[str, str], ctypes._CFuncPtr] = {}
        for name, argtypes in _SIGNATURES.items():
            for suffix in SUPPORTED_DTYPES.values():
                fn = getattr(lib, f"surge_{name}_{suffix}")
                fn.argtypes = argtypes
                fn.restype = None
                self._fns[(name, suffix)] = fn
        self._argmax = lib.surge_argmax_rows
        self._argmax.argtypes = [_P, _P, _I, _I]
        self._argmax.restype = None
        self.has_linear = bool(lib.surge_linear_bf16_supported())
        self._pack_linear = lib.surge_pack_linear_bf16
        self._pack_linear.argtypes = [_P, _P, _I, _I]
        self._pack_linear.restype = None
        self._linear = lib.surge_linear_bf16
        self._linear.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_int]
        self._linear.restype = None
        self._linear_amx = lib.surge_linear_amx
        self._linear_amx.argtypes = self._linear.argtypes
        self._linear_amx.restype = None
        self._qlinear = lib.surge_qlinear
        self._qlinear.argtypes = [_P, _I, _P, _I, _I, _P, _I, _I, _C, _P, _C, _C]
        self._qlinear.restype = None
        self._qdequant_rows = lib.surge_qdequant_rows
        self._qdequant_rows.argtypes = [_P, _P, _P, _I, _I, ctypes.c_int, ctypes.c_int]
        self._qdequant_rows.restype = None
        self.qlinear_isa = QLINEAR_ISAS[lib.surge_qlinear_isa()]
        # the C decode step for each activation dtype (see decode_step.py)
        self.decode_step_fns: dict[torch.dtype, ctypes._CFuncPtr] = {}
        for dtype, name in (
            (torch.bfloat16, "surge_decode_step"),
            (torch.float32, "surge_decode_step_f32"),
        ):
            fn = getattr(lib, name)
            fn.argtypes = decode_step.SIGNATURE
            fn.restype = None
            self.decode_step_fns[dtype] = fn
        self.linear_isa = linear_isa
        if linear_isa == AMX_BF16:
            if not lib.surge_linear_amx_supported():
                raise ValueError(_PROBE_FAILURES[4])
            if lib.surge_amx_request_permission() != 0:  # per process: every thread may tile
                raise OSError(_PROBE_FAILURES[2])

    @staticmethod
    def supports(dtype: torch.dtype, head_dim: int) -> bool:
        """Whether a model of this dtype and head size can run on these kernels."""
        return dtype in SUPPORTED_DTYPES and head_dim % 16 == 0 and head_dim <= 256

    def _fn(self, name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
        return self._fns[(name, SUPPORTED_DTYPES[dtype])]

    def decode_attention(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> None:
        """out[s] = attention of q[s] over sequence s's blocks; q/out [S, H, D], rows may be strided.

        block_tables: int32 [S, max_blocks]; context_lens: int32 [S]; caches [slots, Hkv, D].
        """
        num_seqs, num_heads, head_dim = q.shape
        _, num_kv_heads, _ = k_cache.shape
        self._fn("decode_attention", q.dtype)(
            out.data_ptr(),
            q.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            block_tables.data_ptr(),
            context_lens.data_ptr(),
            num_seqs,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            block_tables.shape[1],
            q.stride(0),
            out.stride(0),
            scale,
        )

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """RMSNorm of x [N, dim]; with residual, residual += x in place and its norm is returned."""
        out = torch.empty_like(x)
        self._fn("rms_norm", x.dtype)(
            out.data_ptr(),
            _ptr(residual),
            x.data_ptr(),
            weight.data_ptr(),
            x.shape[0],
            x.shape[1],
            eps,
        )
        return out

    def rope_and_cache(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_heads: int,
        interleaved: bool,
    ) -> None:
        """Rotate q and k inside the fused qkv rows [T, (H + 2 Hkv) * D] in place, store k and v.

        cos/sin: float32 [T, rotary_dim // 2]; slot_mapping: int64 [T].
        """
        _, num_kv_heads, head_dim = k_cache.shape
        self._fn("rope_and_cache", qkv.dtype)(
            qkv.data_ptr(),
            qkv.stride(0),
            cos.data_ptr(),
            sin.data_ptr(),
            slot_mapping.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            qkv.shape[0],
            num_heads,
            num_kv_heads,
            head_dim,
            cos.shape[-1] * 2,
            int(interleaved),
        )

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up over rows of [gate | up] ([N, 2 * width] -> [N, width])."""
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty((rows, width), dtype=gate_up.dtype)
        self._fn("silu_and_mul", gate_up.dtype)(out.data_ptr(), gate_up.data_ptr(), rows, width)
        return out

    def can_linear(self, weight: torch.Tensor) -> bool:
        """Whether `linear` can take this weight: bf16 [N, K] on CPU, K even, AVX-512 BF16 built."""
        return (
            self.has_linear
            and weight.device.type == "cpu"
            and weight.dtype == torch.bfloat16
            and weight.dim() == 2
            and weight.shape[1] % 2 == 0
        )

    def pack_linear(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight [N, K] in the blocked layout `linear` reads (a flat bf16 tensor)."""
        n, k = weight.shape
        weight = weight.contiguous()
        packed = torch.empty(-(-n // LINEAR_COLS) * LINEAR_COLS * k, dtype=torch.bfloat16)
        self._pack_linear(packed.data_ptr(), weight.data_ptr(), n, k)
        return packed

    def linear_uses_amx(self, in_features: int) -> bool:
        """Whether `linear` runs a layer of this K on AMX: decided per layer (its K), never per
        batch, since the two kernels round differently."""
        return self.linear_isa == AMX_BF16 and in_features % AMX_DEPTH == 0

    def linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        out_features: int,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """x [..., K] @ W^T + bias for a weight packed by `pack_linear`; [..., N] in out_dtype.

        out_dtype float32 keeps the float32 accumulators unrounded (for logits).
        """
        rows = _rows(x, "bf16 linear")
        k = rows.shape[1]
        out = torch.empty((rows.shape[0], out_features), dtype=out_dtype)
        (self._linear_amx if self.linear_uses_amx(k) else self._linear)(
            out.data_ptr(),
            rows.data_ptr(),
            packed.data_ptr(),
            _ptr(bias),
            rows.shape[0],
            out_features,
            k,
            rows.stride(0),
            out.stride(0),
            int(out_dtype == torch.float32),
        )
        return out.view(*x.shape[:-1], out_features)

    def qlinear(
        self,
        x: torch.Tensor,
        segments: list[tuple[int, QuantizedTensor]],
        out_features: int,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """x [..., K] (bf16 or float32) @ W^T + bias (x's dtype), W stacked from quantized
        segments [(first column, W_i)].

        Each segment writes its own columns of one output, in out_dtype (x's by default; float32
        keeps the accumulators unrounded, for logits).
        """
        rows = _rows(x, "quantized linear", (torch.bfloat16, torch.float32))
        k = rows.shape[1]
        out = torch.empty((rows.shape[0], out_features), dtype=out_dtype or x.dtype)
        for col0, w in segments:
            bias_part = None if bias is None else bias[col0 : col0 + w.shape[0]]
            self._qlinear(
                out.data_ptr() + col0 * out.element_size(),
                out.stride(0),
                rows.data_ptr(),
                rows.stride(0),
                rows.shape[0],
                w.data.data_ptr(),
                w.shape[0],
                k,
                w.qtype,
                _ptr(bias_part),
                int(out.dtype == torch.float32),
                int(rows.dtype == torch.float32),
            )
        return out.view(*x.shape[:-1], out_features)

    def qembedding(
        self, ids: torch.Tensor, table: QuantizedTensor, dtype: torch.dtype = torch.bfloat16
    ) -> torch.Tensor:
        """Rows `ids` of a quantized [V, D] table as dtype (bf16 or float32) [..., D] (an
        embedding lookup)."""
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        dim = table.shape[1]
        out = torch.empty((flat.shape[0], dim), dtype=dtype)
        self._qdequant_rows(
            out.data_ptr(),
            table.data.data_ptr(),
            flat.data_ptr(),
            flat.shape[0],
            dim,
            table.qtype,
            int(dtype == torch.float32),
        )
        return out.view(*ids.shape, dim)

    def argmax(self, logits: torch.Tensor) -> list[int]:
        """torch.argmax(logits, -1).tolist() for contiguous float32 [N, V] rows, faster on CPU."""
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        self._argmax(out.data_ptr(), logits.data_ptr(), logits.shape[0], logits.shape[1])
        return out.tolist()


def _cache_dir() -> Path:
    """Where built libraries live: `$SURGE_KERNEL_CACHE` if set, else `~/.cache/surge/kernels`."""
    env = os.environ.get("SURGE_KERNEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "surge" / "kernels"


def _cpu_signature() -> str:
    # -march=native: a library built on one CPU must not be reused on another
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def build_library(compiler: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the kernels (cached); extra_flags=("-DSURGE_GENERIC",) builds the portable path."""
    flags = (*FLAGS, *extra_flags)
    source = b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS))
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    key = hashlib.sha256(
        source + " ".join(flags).encode() + version.encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: several processes may build at once
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, *map(str, SOURCES), "-o", tmp],
            capture_output=True,
            text=True,
            check=True,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def find_compiler() -> str | None:
    """$CXX, else g++ or c++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def probe_amx(library: Path) -> str | None:
    """None where the AMX linear ran correctly in a child process; else why it can't be used."""
    code = "import ctypes, sys; sys.exit(ctypes.CDLL(sys.argv[1]).surge_amx_probe())"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(library)], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the AMX probe could not run: {exc}"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return f"the AMX probe died with {signal.Signals(-proc.returncode).name}"
    detail = _PROBE_FAILURES.get(proc.returncode, proc.stderr.strip()[-500:])
    return f"the AMX probe failed: {detail}"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it can't be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_linear_isa(library: Path, lib: ctypes.CDLL) -> str:
    """AMX where the CPU has it and the probe passed; AVX-512 BF16 otherwise. Logs the choice."""
    forced = os.environ.get("SURGE_CPU_LINEAR", "auto")
    if forced in ("avx512", AVX512_BF16):
        logger.info("bf16 linears: AVX-512 BF16 kernel (SURGE_CPU_LINEAR=%s)", forced)
        return AVX512_BF16
    if forced not in ("auto", "amx", AMX_BF16):
        logger.warning("SURGE_CPU_LINEAR=%s is not auto, amx or avx512: treated as auto", forced)
    if not lib.surge_linear_bf16_supported():
        return AVX512_BF16  # no bf16 linear kernel at all: the models use oneDNN's
    if not {"amx_tile", "amx_bf16"} <= cpu_flags():
        logger.info("bf16 linears: AVX-512 BF16 kernel (the CPU has no AMX-BF16)")
        return AVX512_BF16
    failure = probe_amx(library)
    if failure is not None:
        logger.warning("bf16 linears: AVX-512 BF16 kernel, not AMX: %s", failure)
        return AVX512_BF16
    logger.info("bf16 linears: AMX-BF16 tiles (the start-up probe passed)")
    return AMX_BF16


@functools.cache
def load_cpu_kernels() -> CpuKernels | None:
    """The compiled kernels, or None where they are turned off or cannot be built here."""
    if os.environ.get("SURGE_CPU_KERNELS", "1") == "0":
        return None
    compiler = find_compiler()
    if compiler is None:
        logger.warning("no C++ compiler found: fused CPU kernels off (pure torch path)")
        return None
    try:
        library = build_library(compiler)
        lib = ctypes.CDLL(str(library))
        return CpuKernels(lib, choose_linear_isa(library, lib))
    except (OSError, subprocess.CalledProcessError, AttributeError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("fused CPU kernels failed to build, pure torch path: %s", detail)
        return None
