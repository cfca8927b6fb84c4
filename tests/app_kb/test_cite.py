"""The RAG prompt, "not found", and checking an answer's citations."""

from __future__ import annotations

from surge.app.kb.cite import (
    NOT_FOUND,
    Citation,
    Relevance,
    TextSegment,
    UnverifiedCitation,
    build_prompt,
    cited_passages,
    select_relevant,
    source_label,
    verify_citations,
)
from surge.app.kb.index import Hit, Passage

P1 = Passage(11, 1, "handbook.pdf", 3, "Leave > Sick leave", "Tell your manager before 10 am.")
P2 = Passage(12, 2, "policy.md", None, None, "Receipts are needed above 25 euros.")


def hit(passage: Passage, vector: float, coverage: float) -> Hit:
    return Hit(passage, vector / 2 + coverage / 2, 1.0, vector, coverage, 1, 1)


def test_prompt_numbers_relevant_passages_with_sources() -> None:
    hits = [hit(P1, 0.62, 0.1), hit(P2, 0.05, 0.8), hit(P1, 0.1, 0.2)]  # the last is noise
    prompt = build_prompt("When must I tell my manager?", hits)
    assert prompt.found and prompt.passages == [P1, P2] and prompt.language == "en"
    system, user = (m["content"] for m in prompt.messages)
    assert NOT_FOUND["en"] in system and "[1]" in system
    assert "[1] (handbook.pdf, p. 3, Leave > Sick leave)\nTell your manager" in user
    assert "[2] (policy.md)\nReceipts" in user
    assert user.endswith("Question: When must I tell my manager?")


def test_nothing_relevant_means_not_found() -> None:
    prompt = build_prompt("火星有几颗卫星？", [hit(P1, 0.2, 0.1)])
    assert not prompt.found and prompt.passages == [] and prompt.language == "zh"
    assert prompt.not_found_text == NOT_FOUND["zh"] and "（无）" in prompt.messages[1]["content"]
    assert select_relevant([hit(P1, 0.2, 0.1)], Relevance(min_vector=0.2)) != []


def test_verified_unverified_and_grouped_citations() -> None:
    answer = "Tell your manager [1]. Receipts above 25 euros [2][3]. Both apply [1, 2]【2】."
    segments = verify_citations(answer, [P1, P2])
    assert segments == [
        TextSegment("Tell your manager "),
        Citation(1, P1),
        TextSegment(". Receipts above 25 euros "),
        Citation(2, P2),
        UnverifiedCitation(3, "[3]"),
        TextSegment(". Both apply "),
        Citation(1, P1),
        Citation(2, P2),
        Citation(2, P2),
        TextSegment("."),
    ]
    assert cited_passages(segments) == [(1, P1), (2, P2)]


def test_code_links_ranges_and_zero_are_handled() -> None:
    answer = "Use `arr[1]` or\n```py\nx[2]\n```\nsee [link](http://x) [0] [1-2] [1-999]"
    segments = verify_citations(answer, [P1, P2])
    assert segments == [
        TextSegment("Use `arr[1]` or\n```py\nx[2]\n```\nsee [link](http://x) "),
        UnverifiedCitation(0, "[0]"),
        TextSegment(" "),
        Citation(1, P1),
        Citation(2, P2),
        TextSegment(" [1-999]"),
    ]
    streaming = verify_citations("partial ```code [1] not closed", [P1])
    assert streaming == [TextSegment("partial ```code [1] not closed")]
    assert verify_citations("", [P1]) == []


def test_source_label_in_chinese() -> None:
    assert source_label(P1, "zh") == "handbook.pdf, 第 3 页, Leave > Sick leave"
