"""Sizes and rates as `surge plan` reads them."""

from __future__ import annotations

import pytest

from surge.plan.units import format_rate, parse_rate, parse_size
from surge.router.memory import format_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * 2**30),
        ("80G", 80 * 2**30),
        ("80Gi", 80 * 2**30),
        ("512MiB", 512 * 2**20),
        ("512m", 512 * 2**20),
        ("16GB", 16 * 10**9),
        ("1.5GiB", 3 * 2**29),
        ("4096", 4096),
        ("2e9", 2 * 10**9),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "24 parsecs", "-1GiB", "1.2.3G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("80GB/s", 80e9), ("2TB/s", 2e12), ("936 GB/s", 936e9), ("312T", 312e12), ("1e11", 1e11)],
)
def test_parse_rate(text: str, expected: float) -> None:
    assert parse_rate(text) == pytest.approx(expected)


def test_format() -> None:
    assert format_bytes(24 * 2**30) == "24.0 GiB"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_rate(936e9, "B") == "936 GB/s"
    assert format_rate(71e12, "FLOP") == "71 TFLOP/s"
