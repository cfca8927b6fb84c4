"""Splitting: boundaries in Chinese and English, sizes, overlap, metadata."""

from __future__ import annotations

import re

import pytest

from surge.app.kb.parse import Section
from surge.app.kb.split import SplitConfig, split_sections, split_text

EN = (
    "The dome shutter must stay closed in high wind. The weather mast reports every ten "
    "seconds. If rain is detected, the shutter closes automatically.\n\n"
    "Fault E-4471 means the dome motor has stalled. Clear the ice, then reset the controller. "
    "Never force the shutter by hand! Is the manager reachable? Call them.\n\n"
    "Visitors must not use white flashlights; red lights are handed out at the entrance."
)
ZH = (
    "员工入职满一年后，每年享有带薪年休假。工龄满一年不满十年的，年假为五天；满十年不满二十年的，"
    "年假为十天！当年未休完的年假可以顺延至次年三月三十一日，逾期自动作废？\n\n"
    "年假须至少提前三个工作日在系统中提交表单，由直属主管审批。连续休假超过五天的，还需部门总监"
    "签字同意。春节前后两周为业务高峰期，原则上不批准年假申请。"
)
SENTENCE_END = re.compile(r"[.!?;。！？；]$")


def normalized(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize(("text", "size"), [(EN, 120), (ZH, 60)])
def test_chunks_fit_and_end_at_sentences(text: str, size: int) -> None:
    chunks = split_text(text, SplitConfig(chunk_size=size, overlap=0))
    assert len(chunks) > 2
    assert all(len(chunk) <= size for chunk in chunks)
    assert all(SENTENCE_END.search(chunk) for chunk in chunks), chunks
    assert normalized("".join(chunks)) == normalized(text)  # nothing lost or repeated


@pytest.mark.parametrize(("text", "size"), [(EN, 120), (ZH, 60)])
def test_overlap_repeats_the_previous_tail_from_a_boundary(text: str, size: int) -> None:
    chunks = split_text(text, SplitConfig(chunk_size=size, overlap=size // 3))
    assert len(chunks) > 2
    assert all(len(chunk) <= size for chunk in chunks)
    for previous, chunk in zip(chunks, chunks[1:], strict=False):
        shared = next(
            n for n in range(min(len(previous), len(chunk)), -1, -1) if previous.endswith(chunk[:n])
        )
        assert 0 < shared <= size // 3, (previous, chunk)
        before = previous[-shared - 1]  # the overlap starts right after a boundary
        assert before.isspace() or before in ".!?;。！？；，、：,:", (previous, chunk)


def test_paragraphs_start_chunks_when_the_chunk_is_half_full() -> None:
    paragraphs = ["Alpha one two three four five six seven.", "Beta " * 10 + "end.", "Gamma x."]
    chunks = split_text("\n\n".join(paragraphs), SplitConfig(chunk_size=80, overlap=0))
    assert chunks == [paragraphs[0], paragraphs[1].strip() + "\n\n" + paragraphs[2]]


def test_text_without_boundaries_gets_hard_cuts() -> None:
    chunks = split_text("字" * 250, SplitConfig(chunk_size=100, overlap=20))
    assert all(len(chunk) <= 100 for chunk in chunks)
    assert (
        normalized("".join(chunk[20:] if i else chunk for i, chunk in enumerate(chunks)))
        == "字" * 250
    )
    long_word = "x" * 130 + " tail."
    assert split_text(long_word, SplitConfig(chunk_size=100, overlap=0)) == [
        "x" * 100,
        "x" * 30 + " tail.",
    ]


def test_decimal_points_and_codes_are_not_sentence_ends() -> None:
    text = "The rate is 0.58 euros per km. Version v2.3.1 is current. " * 3
    chunks = split_text(text, SplitConfig(chunk_size=60, overlap=0))
    assert "0.58 euros per km." in chunks[0] and all("v2.3.1" in c or "0.58" in c for c in chunks)


def test_sections_keep_file_page_and_heading() -> None:
    sections = [
        Section("Short intro.", page=1, heading=None),
        Section(ZH, page=2, heading="制度 > 年假"),
    ]
    chunks = split_sections(sections, "policy.pdf", SplitConfig(chunk_size=100, overlap=20))
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    assert chunks[0].text == "Short intro." and chunks[0].page == 1  # sections never merge
    assert all(c.file_name == "policy.pdf" for c in chunks)
    assert {(c.page, c.heading) for c in chunks[1:]} == {(2, "制度 > 年假")}


def test_defaults_and_validation() -> None:
    assert SplitConfig() == SplitConfig(chunk_size=500, overlap=80)
    for bad in ({"chunk_size": 10}, {"overlap": -1}, {"chunk_size": 100, "overlap": 60}):
        with pytest.raises(ValueError):
            SplitConfig(**bad)
    assert split_text("") == [] and split_text(" \n\n ") == []
