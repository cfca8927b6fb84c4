"""The follow-up detector and the conversation's query (no model: retrieval quality of
follow-ups is measured in test_golden.py)."""

from __future__ import annotations

import numpy as np
import pytest

from surge.app.kb.bm25 import BM25
from surge.app.kb.followup import (
    SearchQuery,
    clean_rewrite,
    conversation_query,
    is_follow_up,
    rewrite_messages,
)
from surge.app.kb.index import query_vector, weighted_tokens


@pytest.mark.parametrize(
    "question",
    [
        "What about its price?",
        "How do I fix it?",
        "And for children?",
        "Who should I call then?",
        "那产假呢？",
        "它是在哪里制作的？",
        "怎么解决？",
        "要收费吗？",
    ],
)
def test_follow_ups_are_recognized(question: str) -> None:
    assert is_follow_up(question)


@pytest.mark.parametrize(
    "question",
    [
        "Who is Osei Boateng?",  # short, but a name
        "E-3019",  # a code
        "7434 端口是干什么的？",  # a number
        "How much may I spend on food each day when working overseas?",
        "纽扣电池属于哪一类？",
    ],
)
def test_standalone_questions_are_searched_alone(question: str) -> None:
    assert not is_follow_up(question)
    assert conversation_query(["What is hooch?", question]) == SearchQuery(question)


def test_the_conversation_query_keeps_the_recent_user_turns() -> None:
    query = conversation_query(["first", "What is fault E-4471?", "", "Is it dangerous?"])
    assert query.text == "Is it dangerous?"
    assert query.context == "first\nWhat is fault E-4471?"  # the last two non-empty turns
    assert query.full_text == "first\nWhat is fault E-4471?\nIs it dangerous?"
    assert conversation_query(["Is it dangerous?"]) == SearchQuery("Is it dangerous?")
    assert conversation_query([]) == SearchQuery("")


def test_context_terms_weigh_less_in_scores_and_coverage() -> None:
    tokens, weights = weighted_tokens("price of tickets", "observatory tickets", 0.5)
    assert tokens == ["price", "tickets", "observatory"]  # the question's terms once, first
    assert weights == [1.0, 1.0, 0.5]
    bm25 = BM25([["price"], ["observatory"], ["tickets"], ["other"]])
    scores = bm25.scores(tokens, weights)
    assert scores[0] == pytest.approx(2 * scores[1])  # same idf, half the weight
    coverage = bm25.coverage(tokens, np.arange(4), weights)
    assert coverage.tolist() == pytest.approx([0.4, 0.2, 0.4, 0.0])  # of 1 + 1 + 0.5


def test_the_query_vector_leans_on_the_question() -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    vector = query_vector(vectors, 0.5)
    assert np.linalg.norm(vector) == pytest.approx(1.0)
    assert vector[0] == pytest.approx(2 * vector[1])
    assert query_vector(vectors[:1], 0.5).tolist() == [1.0, 0.0]


def test_rewrite_request_and_answers() -> None:
    system, user = rewrite_messages(["a?", "b?", "c?", "Is it safe?"])
    assert "standalone search query" in system["content"]
    assert (
        user["content"] == "Earlier question: b?\nEarlier question: c?\nLast question: Is it safe?"
    )
    assert clean_rewrite(' "Query: is fault E-4471 dangerous" ') == "is fault E-4471 dangerous"
    assert clean_rewrite("   ") is None
    assert clean_rewrite("x" * 1000) is None  # an answer, not a query
