"""Retrieval quality on a golden set made for these tests (tests/app_kb/golden): 8 documents,
English and Chinese, and 44 questions, each with the document and a phrase of the passage
that answers it. "keyword" questions hinge on a rare name, code or number; "meaning" questions
share no BM25 token with their passage (checked below), so only embeddings can find them;
"mixed" ones have some of both. A few questions the documents can't answer calibrate the
"not found" threshold.

The documents go through the real pipeline (parse, split, tokenize, ingest into SQLite, the
index cache); embeddings come from the bundled all-MiniLM-L6-v2, loaded once. Run with -s to
see the hit@k table. That model is English-only: Chinese "meaning" questions are mostly
missed by every method (BM25 can't match a paraphrase, the vectors barely know Chinese)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from surge.app.kb import store
from surge.app.kb.blobs import BlobStore
from surge.app.kb.bm25 import tokenize
from surge.app.kb.cache import IndexCache
from surge.app.kb.cite import build_prompt, question_language, select_relevant
from surge.app.kb.followup import SearchQuery, conversation_query
from surge.app.kb.index import (
    Fusion,
    Hit,
    KnowledgeIndex,
    SearchMode,
    indexed_text,
    query_vector,
)
from surge.app.kb.ingest import Ingestor
from surge.app.kb.parse import parse_document
from surge.app.kb.split import split_sections
from tests.app_kb.conftest import open_store

GOLDEN = Path(__file__).parent / "golden"
QUESTIONS = json.loads((GOLDEN / "questions.json").read_text(encoding="utf-8"))
UNANSWERABLE = json.loads((GOLDEN / "unanswerable.json").read_text(encoding="utf-8"))
FOLLOW_UPS = json.loads((GOLDEN / "followups.json").read_text(encoding="utf-8"))
DOCUMENTS = sorted((GOLDEN / "docs").iterdir())

# Floors a little under the measured values (see the table this prints); hybrid must also
# beat both single methods.
FLOORS = {
    ("bm25", 1): 0.58,  # measured 0.64
    ("bm25", 3): 0.58,  # 0.64
    ("vector", 1): 0.55,  # 0.61
    ("vector", 3): 0.68,  # 0.75
    ("hybrid", 1): 0.78,  # 0.84
    ("hybrid", 3): 0.88,  # 0.93
}


@dataclass
class Golden:
    index: KnowledgeIndex
    questions: np.ndarray  # embeddings of QUESTIONS
    unanswerable: np.ndarray  # embeddings of UNANSWERABLE
    encode: Callable[[list[str]], np.ndarray]


def is_expected(hit: Hit, question: dict[str, str]) -> bool:
    return hit.passage.file_name == question["doc"] and question["passage"] in hit.passage.text


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Golden:
    from sentence_transformers import SentenceTransformer

    from surge.encoders.bundled import pull_default_embedding_model

    model = SentenceTransformer(
        str(pull_default_embedding_model()), device="cpu", local_files_only=True
    )

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=32, normalize_embeddings=True)

    async def embed(texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(encode, texts)

    async def ingest_all() -> KnowledgeIndex:
        data_dir = tmp_path_factory.mktemp("golden")
        engine, sessions = await open_store(data_dir)
        ingestor = Ingestor(sessions, BlobStore(data_dir / "files"), embed)
        try:
            async with sessions() as session:
                kb = await store.create_kb(session, owner_id=1, name="golden")
            uploads = [await ingestor.add(kb.id, p.name, p.read_bytes()) for p in DOCUMENTS]
            for upload in uploads:
                await ingestor.wait(upload.document_id)
            async with sessions() as session:
                documents = await store.list_documents(session, kb.id)
            assert {d.status for d in documents} == {store.DocumentStatus.DONE}
            return await IndexCache(sessions).get(kb.id)
        finally:
            await ingestor.close()
            await engine.dispose()

    index = asyncio.run(ingest_all())
    return Golden(index, encode([q["q"] for q in QUESTIONS]), encode(UNANSWERABLE), encode)


def test_golden_set_is_what_it_claims() -> None:
    assert len(DOCUMENTS) >= 6 and len(QUESTIONS) >= 30
    assert {question_language(p.read_text(encoding="utf-8")) for p in DOCUMENTS} == {"en", "zh"}
    chunks = [
        (path.name, chunk)
        for path in DOCUMENTS
        for chunk in split_sections(parse_document(path.name, path.read_bytes()), path.name)
    ]
    for question in QUESTIONS:
        expected = [
            chunk
            for name, chunk in chunks
            if name == question["doc"] and question["passage"] in chunk.text
        ]
        assert expected, question
        if question["kind"] == "meaning":  # no keyword in common with its passage
            query = set(tokenize(question["q"]))
            for chunk in expected:
                shared = query & set(tokenize(indexed_text(chunk.heading, chunk.text)))
                assert not shared, (question["q"], shared)


COLUMNS = ("all", "keyword", "meaning", "mixed", "en", "zh", "zh meaning")


def hit_rates(golden: Golden, mode: SearchMode, fusion: Fusion) -> dict[str, tuple[float, float]]:
    """hit@1 and hit@3, overall and per question kind and language."""
    found: dict[str, list[tuple[bool, bool]]] = {}
    for question, vector in zip(QUESTIONS, golden.questions, strict=True):
        hits = golden.index.search(question["q"], vector, top_k=3, mode=mode, fusion=fusion)
        marks = [is_expected(hit, question) for hit in hits]
        language = question_language(question["q"])
        groups = ["all", question["kind"], language, f"{language} {question['kind']}"]
        for group in groups:
            found.setdefault(group, []).append((any(marks[:1]), any(marks)))
    return {
        group: (sum(r[0] for r in rs) / len(rs), sum(r[1] for r in rs) / len(rs))
        for group, rs in found.items()
    }


def print_table(table: dict[str, dict[str, tuple[float, float]]]) -> None:
    print(f"\n{len(QUESTIONS)} questions, {len(DOCUMENTS)} documents; hit@1 / hit@3")
    print(f"{'method':<11}" + "".join(f"{column:>13}" for column in COLUMNS))
    for name, rates in table.items():
        print(f"{name:<11}" + "".join(f"{rates[c][0]:>7.2f}{rates[c][1]:>6.2f}" for c in COLUMNS))


def test_hybrid_beats_bm25_and_vectors(golden: Golden) -> None:
    methods = {
        "bm25": (SearchMode.BM25, Fusion.MIX),
        "vector": (SearchMode.VECTOR, Fusion.MIX),
        "hybrid": (SearchMode.HYBRID, Fusion.MIX),  # the default fusion
        "hybrid-rrf": (SearchMode.HYBRID, Fusion.RRF),
    }
    table = {name: hit_rates(golden, *method) for name, method in methods.items()}
    print_table(table)
    for (name, k), floor in FLOORS.items():
        assert table[name]["all"][k > 1] >= floor, (name, k, table[name]["all"])
    for k in (0, 1):
        assert table["hybrid"]["all"][k] > table["bm25"]["all"][k]
        assert table["hybrid"]["all"][k] > table["vector"]["all"][k]


def test_relevance_threshold_separates_answerable_from_not(golden: Golden) -> None:
    passed = 0
    for question, vector in zip(QUESTIONS, golden.questions, strict=True):
        hits = golden.index.search(question["q"], vector, top_k=5)
        passed += any(is_expected(hit, question) for hit in select_relevant(hits))
    print(f"\nexpected passage retrieved in the top 5 and relevant: {passed}/{len(QUESTIONS)}")
    for question, vector in zip(UNANSWERABLE, golden.unanswerable, strict=True):
        hits = golden.index.search(question, vector, top_k=5)
        prompt = build_prompt(question, hits)
        print(f"unanswerable {question!r}: {'FOUND' if prompt.found else 'not found'}", end="")
        print(f" (max cosine {max(h.vector for h in hits):.2f})")
        if prompt.language == "en":  # MiniLM gives unrelated Chinese texts cosines near 0.5
            assert not prompt.found, question
    assert passed / len(QUESTIONS) >= 0.85


# Follow-ups (golden/followups.json): conversations whose last question needs the earlier ones
# ("How do I fix it?"), and topic switches, whose last question must still be searched alone.
# Run with -s for the table: hit@1 / hit@3 of the last question alone and of the
# conversation's query (followup.conversation_query).
FOLLOW_UP_FLOORS = {  # of the conversation's query; measured with CONTEXT_WEIGHT 0.3 to 1.0:
    ("bm25", 1): 0.85,  # 0.93-0.96 (the last question alone: 0.56)
    ("bm25", 3): 0.90,  # 0.96 (0.63)
    ("vector", 1): 0.55,  # 0.63 (0.37)
    ("vector", 3): 0.70,  # 0.70-0.81 (0.52)
    ("hybrid", 1): 0.90,  # 0.96-1.00 (0.78)
    ("hybrid", 3): 0.95,  # 1.00 (0.78)
}
FOLLOW_UP_COLUMNS = ("all", "follow-up", "switch", "en", "zh")


def search_query(golden: Golden, query: SearchQuery, mode: SearchMode) -> list[Hit]:
    texts = [query.text, query.context] if query.context else [query.text]
    vector = query_vector(golden.encode(texts), query.context_weight)
    return golden.index.search(
        query.text,
        vector,
        top_k=3,
        mode=mode,
        context=query.context,
        context_weight=query.context_weight,
    )


def follow_up_rates(
    golden: Golden, mode: SearchMode, with_conversation: bool
) -> dict[str, tuple[float, float]]:
    found: dict[str, list[tuple[bool, bool]]] = {}
    for case in FOLLOW_UPS:
        turns = case["turns"]
        query = conversation_query(turns) if with_conversation else SearchQuery(turns[-1])
        marks = [is_expected(hit, case) for hit in search_query(golden, query, mode)]
        for group in ("all", case["kind"], question_language(turns[-1])):
            found.setdefault(group, []).append((any(marks[:1]), any(marks)))
    return {
        group: (sum(r[0] for r in rs) / len(rs), sum(r[1] for r in rs) / len(rs))
        for group, rs in found.items()
    }


def test_golden_follow_ups_are_what_they_claim() -> None:
    assert len(FOLLOW_UPS) >= 20
    for case in FOLLOW_UPS:  # a topic switch is a standalone question: no context added
        if case["kind"] == "switch":
            assert not conversation_query(case["turns"]).context, case["turns"]


def test_follow_ups_retrieve_with_the_conversation(golden: Golden) -> None:
    table = {}
    for mode in (SearchMode.BM25, SearchMode.VECTOR, SearchMode.HYBRID):
        table[f"{mode.value} last"] = follow_up_rates(golden, mode, with_conversation=False)
        table[f"{mode.value} conv"] = follow_up_rates(golden, mode, with_conversation=True)
    print(f"\n{len(FOLLOW_UPS)} conversations; hit@1 / hit@3, last question alone vs conversation")
    print(f"{'method':<14}" + "".join(f"{column:>13}" for column in FOLLOW_UP_COLUMNS))
    for name, rates in table.items():
        row = "".join(f"{rates[c][0]:>7.2f}{rates[c][1]:>6.2f}" for c in FOLLOW_UP_COLUMNS)
        print(f"{name:<14}{row}")
    for (name, k), floor in FOLLOW_UP_FLOORS.items():
        assert table[f"{name} conv"]["all"][k > 1] >= floor, (name, k, table[f"{name} conv"])
    for k in (0, 1):
        assert table["hybrid conv"]["all"][k] > table["hybrid last"]["all"][k]
        # a topic switch is searched as before
        assert table["hybrid conv"]["switch"][k] == table["hybrid last"]["switch"][k]


def test_follow_up_passages_pass_the_relevance_threshold(golden: Golden) -> None:
    """A follow-up's passage is found relevant (its answer isn't "not found") about as often as
    a standalone question's (40/44 in test_relevance_threshold_separates_answerable_from_not)."""
    passed = {False: 0, True: 0}
    for case in FOLLOW_UPS:
        for with_conversation in (False, True):
            turns = case["turns"]
            query = conversation_query(turns) if with_conversation else SearchQuery(turns[-1])
            texts = [query.text, query.context] if query.context else [query.text]
            vector = query_vector(golden.encode(texts), query.context_weight)
            hits = golden.index.search(
                query.text,
                vector,
                top_k=5,
                context=query.context,
                context_weight=query.context_weight,
            )
            relevant = select_relevant(hits)
            passed[with_conversation] += any(is_expected(hit, case) for hit in relevant)
    print(
        f"\nfollow-up passage retrieved in the top 5 and relevant: last question alone "
        f"{passed[False]}/{len(FOLLOW_UPS)}, conversation {passed[True]}/{len(FOLLOW_UPS)}"
    )
    assert passed[True] / len(FOLLOW_UPS) >= 0.85
