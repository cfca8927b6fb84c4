"""Answers with sources: the RAG prompt with numbered passages, and checking the citations.

Retrieval always returns something; `select_relevant` keeps only passages whose cosine
similarity or keyword coverage clears a threshold, so "nothing relevant" is a real outcome:
then `RagPrompt.found` is False and the app can answer `not_found_text` without the model.
The prompt also tells the model to give that same sentence when the passages it got don't
hold the answer. After the answer, `verify_citations` turns it into segments: a [k] naming a
passage the model was given becomes a citation of that passage, any other number stays plain
text (`UnverifiedCitation`), never a link."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from surge.app.kb.index import Hit, Passage

NOT_FOUND = {
    "en": "Not found in the knowledge base.",
    "zh": "知识库中没有找到相关内容。",
}
_SYSTEM = {
    "en": (
        "Answer the user's question using only the numbered passages from their knowledge "
        "base. After each statement, cite the passages that support it as [1], [2], using only "
        "the numbers given. Do not use outside knowledge. If the passages do not contain the "
        'answer, reply exactly: "{not_found}"'
    ),
    "zh": (
        "只根据用户知识库中带编号的段落回答问题。每句陈述之后用 [1]、[2] 这样的编号标注依据的"
        "段落，只能使用给出的编号，不要使用段落以外的知识。如果这些段落里没有答案，"
        "请原样回答：“{not_found}”"
    ),
}
_LABELS = {
    "en": ("Passages", "Question", "(none)"),
    "zh": ("段落", "问题", "（无）"),
}
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


@dataclass(frozen=True, slots=True)
class Relevance:
    """When a retrieved passage counts as relevant: either score clears its threshold.

    Both scores mean the same in every knowledge base (see `index.Hit`). The defaults were
    calibrated on tests/app_kb/golden with all-MiniLM-L6-v2: the expected passage is in the top
    5 and passes for 40 of 44 answerable questions, and nothing passes for the English
    questions the documents can't answer (their best cosines: 0.14-0.29). That model is
    English-only: unrelated Chinese texts get cosines near 0.5, so for Chinese the vector test
    passes too much (3 of 3 unanswerable Chinese questions "found"); a multilingual embedding
    model, with its own `min_vector`, fixes that. The prompt's rule is the second guard."""

    min_vector: float = 0.3  # cosine similarity
    min_coverage: float = 0.5  # share of the query's idf mass present in the passage


@dataclass(frozen=True, slots=True)
class RagPrompt:
    """The chat messages for a knowledge-base answer and the passages they number."""

    messages: list[dict[str, str]]
    passages: list[Passage]  # passages[k - 1] is [k]
    found: bool  # False: nothing relevant was retrieved
    language: str  # "en" or "zh"

    @property
    def not_found_text(self) -> str:
        return NOT_FOUND[self.language]


@dataclass(frozen=True, slots=True)
class TextSegment:
    text: str


@dataclass(frozen=True, slots=True)
class Citation:
    """A verified [k]: the passage it names was given to the model."""

    number: int
    passage: Passage


@dataclass(frozen=True, slots=True)
class UnverifiedCitation:
    """A [k] that names no passage the model was given: shown as text, not as a link."""

    number: int
    text: str


Segment = TextSegment | Citation | UnverifiedCitation


def select_relevant(hits: Sequence[Hit], relevance: Relevance | None = None) -> list[Hit]:
    """The hits that clear either threshold, in their order."""
    relevance = relevance or Relevance()
    return [
        hit
        for hit in hits
        if hit.vector >= relevance.min_vector or hit.coverage >= relevance.min_coverage
    ]


def question_language(question: str) -> str:
    """ "zh" when the question has Chinese characters, else "en"."""
    return "zh" if _CJK.search(question) else "en"


def source_label(passage: Passage, language: str = "en") -> str:
    """Where a passage comes from: "guide.pdf, p. 3, Install > Linux"."""
    parts = [passage.file_name]
    if passage.page is not None:
        parts.append(f"p. {passage.page}" if language == "en" else f"第 {passage.page} 页")
    if passage.heading:
        parts.append(passage.heading)
    return ", ".join(parts)


def build_prompt(
    question: str,
    hits: Sequence[Hit],
    *,
    relevance: Relevance | None = None,
    language: str | None = None,
) -> RagPrompt:
    """Messages asking `question` over the relevant `hits`, numbered [1]..[n] in order."""
    language = language if language in NOT_FOUND else question_language(question)
    passages = [hit.passage for hit in select_relevant(hits, relevance)]
    title, ask, none = _LABELS[language]
    blocks = [
        f"[{number}] ({source_label(passage, language)})\n{passage.text}"
        for number, passage in enumerate(passages, 1)
    ]
    user = f"{title}:\n\n" + ("\n\n".join(blocks) or none) + f"\n\n{ask}: {question}"
    system = _SYSTEM[language].format(not_found=NOT_FOUND[language])
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return RagPrompt(messages, passages, bool(passages), language)


# [1], [1, 2], [1-3], 【1】; not a markdown link's text ("[1](url)").
_CITATION = re.compile(r"[\[【]\s*(\d{1,3}(?:\s*(?:[,，、]|-|–)\s*\d{1,3})*)\s*[\]】](?!\()")
_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.DOTALL)
MAX_RANGE = 20


def verify_citations(answer: str, passages: Sequence[Passage]) -> list[Segment]:
    """`answer` as text and citation segments; code (fenced or inline) is left as text."""
    segments: list[Segment] = []
    position = 0
    for code in _CODE.finditer(answer):
        segments.extend(_prose_segments(answer[position : code.start()], passages))
        segments.append(TextSegment(code.group()))
        position = code.end()
    segments.extend(_prose_segments(answer[position:], passages))
    return _merge_text(segments)


def cited_passages(segments: Sequence[Segment]) -> list[tuple[int, Passage]]:
    """The verified citations, each number once, in order of first use."""
    seen: dict[int, Passage] = {}
    for segment in segments:
        if isinstance(segment, Citation):
            seen.setdefault(segment.number, segment.passage)
    return list(seen.items())


def _prose_segments(text: str, passages: Sequence[Passage]) -> list[Segment]:
    segments: list[Segment] = []
    position = 0
    for match in _CITATION.finditer(text):
        segments.append(TextSegment(text[position : match.start()]))
        numbers = _numbers(match.group(1))
        if numbers is None:  # an absurd range: not a citation at all
            segments.append(TextSegment(match.group()))
        for number in numbers or []:
            if 1 <= number <= len(passages):
                segments.append(Citation(number, passages[number - 1]))
            else:
                segments.append(UnverifiedCitation(number, f"[{number}]"))
        position = match.end()
    segments.append(TextSegment(text[position:]))
    return segments


def _numbers(spec: str) -> list[int] | None:
    """ "1, 3-5" → [1, 3, 4, 5]; None for a range wider than MAX_RANGE."""
    numbers: list[int] = []
    for part in re.split(r"\s*[,，、]\s*", spec.strip()):
        bounds = [int(n) for n in re.split(r"\s*[-–]\s*", part)]
        low, high = bounds[0], bounds[-1]
        if high < low or high - low > MAX_RANGE:
            return None
        numbers.extend(range(low, high + 1))
    return numbers


def _merge_text(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if isinstance(segment, TextSegment):
            if not segment.text:
                continue
            if merged and isinstance(merged[-1], TextSegment):
                merged[-1] = TextSegment(merged[-1].text + segment.text)
                continue
        merged.append(segment)
    return merged
