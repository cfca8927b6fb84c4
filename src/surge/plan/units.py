"""Parse and print sizes ("24GiB", "80G", "512MiB") and rates ("80GB/s", "312T")."""

from __future__ import annotations

import re

# A bare K/M/G/T is binary, as in `free -g` and GPU spec sheets (a "24 GB" RTX 3090 has 24 GiB);
# KB/MB/GB/TB are decimal, as memory bandwidth is quoted ("936 GB/s").
_BINARY = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'24GiB', '24Gi', '24G' -> 24 * 2**30; '80GB' -> 80 * 10**9; '4096' -> 4096 bytes."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (e.g. 24GiB, 80G, 512MiB, 16GB)")
    number, prefix, binary, byte = m.groups()
    prefix = prefix.lower()
    decimal = byte and not binary and prefix  # "GB" is decimal; "G", "Gi", "GiB" binary
    scale = _DECIMAL[prefix] if decimal else _BINARY[prefix]
    return int(float(number) * scale)


def parse_rate(text: str) -> float:
    """'80GB/s', '80G', '2.0TB/s' -> units per second, decimal prefixes ('312T' FLOP/s too)."""
    core = re.sub(r"(?i)(/s|flops?|b)$", "", text.strip().removesuffix("/s")).strip()
    m = re.match(r"^([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)i?$", core, re.IGNORECASE)
    if m is None:
        raise ValueError(f"not a rate: {text!r} (e.g. 80GB/s, 2TB/s, 312T)")
    return float(m.group(1)) * _DECIMAL[m.group(2).lower()]


def format_rate(per_s: float, unit: str) -> str:
    """Decimal: 936e9, 'B' -> '936 GB/s'; 71e12, 'FLOP' -> '71 TFLOP/s'."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if per_s >= scale:
            return f"{per_s / scale:.3g} {prefix}{unit}/s"
    return f"{per_s:.3g} {unit}/s"
