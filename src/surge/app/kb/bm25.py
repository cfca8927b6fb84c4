"""Keyword retrieval: a tokenizer for English and Chinese, and Okapi BM25 over postings arrays.

Tokens: English (and any other space-separated script) as lowercased words, plus codes kept
whole ("E-4471" → "e-4471", "e", "4471"); Chinese with jieba in search mode, which adds the
short words inside long ones ("知识库" → "知识", "知识库"). jieba loads its dictionary once,
lazily, in about 0.6 s (cached under the temp dir after the first run), then segments about
0.5 M characters/s on one core: cheap enough that character bigrams were not needed.

Scores are those of rank-bm25's `BM25Okapi` (k1=1.5, b=0.75) with Lucene's idf,
log(1 + (N - n + 0.5) / (n + 0.5)), which is positive for every term: Okapi's own idf is 0 for a
term in half the chunks and negative above, so in a 2-chunk file (file chat) a word of one chunk
scored nothing. A test checks the scores against rank-bm25 with that idf. Computed from postings in numpy arrays
instead of a dict per chunk: a query costs a few array operations per query term, and the
index takes ~8 bytes per (chunk, distinct term) instead of a Python dict per chunk."""

from __future__ import annotations

import functools
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN_RUNS = re.compile(rf"([{_CJK}]+)|([^\W_{_CJK}]+(?:[._\-/][^\W_{_CJK}]+)*)")
_WORD_PARTS = re.compile(rf"[^\W_{_CJK}]+")

# Function words that match nearly every passage and so only add noise to short queries.
STOPWORDS = frozenset(
    """a an the and or but if of to in on at by for with from as into about over after before
    is are was were be been being am do does did doing have has had having it its this that
    these those there here what which who whom whose when where why how i me my we our you your
    he him his she her they them their not no so than too very can could should would will
    shall may might must just also any all some such each other more most own same s t only
    的 了 是 在 和 与 及 或 吗 呢 吧 啊 么 什么 怎么 怎样 如何 哪 哪些 哪个 哪里 多少 为什么
    我 你 他 她 它 我们 你们 他们 这 那 这个 那个 这些 那些 有 一个 可以 需要 会 要 能 都 也
    就 还 被 把 对 从 到 给 让 请 问 等 中 之 其 上 下 而 并 则 即 后 再 前 时 里 又 很 更 最
    已 将 才 得 地 着 过 个""".split()
)


@functools.cache
def _segmenter():  # type: ignore[no-untyped-def]
    """jieba's segmenter, loaded on first use (never at import)."""
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading chatter goes to stderr
    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    return tokenizer


def tokenize(text: str) -> list[str]:
    """BM25 tokens of `text`: lowercased words and codes, jieba words for Chinese, no stopwords."""
    tokens: list[str] = []
    for cjk, word in _TOKEN_RUNS.findall(unicodedata.normalize("NFKC", text).lower()):
        if cjk:
            tokens.extend(_segmenter().cut_for_search(cjk))
            continue
        tokens.append(word)
        parts = _WORD_PARTS.findall(word)
        if len(parts) > 1:  # a code: "e-4471" also matches "e" and "4471" on their own
            tokens.extend(parts)
    return [token for token in tokens if token not in STOPWORDS and token.strip()]


class BM25:
    """Okapi BM25 over pre-tokenized chunks; `scores` of a query against every chunk."""

    def __init__(
        self,
        corpus: Sequence[Sequence[str]],
        *,
        k1: float = 1.5,
        b: float = 0.75,
    ) -> None:
        self.k1 = k1
        self.num_docs = len(corpus)
        self._vocab: dict[str, int] = {}
        doc_ids: list[int] = []
        term_ids: list[int] = []
        freqs: list[int] = []
        doc_len = np.zeros(self.num_docs, dtype=np.float32)
        for doc, tokens in enumerate(corpus):
            doc_len[doc] = len(tokens)
            for token, count in Counter(tokens).items():
                term_ids.append(self._vocab.setdefault(token, len(self._vocab)))
                doc_ids.append(doc)
                freqs.append(count)
        terms = np.asarray(term_ids, dtype=np.int32)
        order = np.argsort(terms, kind="stable")  # postings grouped by term
        self._docs = np.asarray(doc_ids, dtype=np.int32)[order]
        self._freqs = np.asarray(freqs, dtype=np.float32)[order]
        self._offsets = np.searchsorted(terms[order], np.arange(len(self._vocab) + 1))
        num_with = np.diff(self._offsets).astype(np.float64)
        self._idf = _lucene_idf(self.num_docs, num_with)
        avg_len = float(doc_len.mean()) if self.num_docs else 0.0
        self._norm = k1 * (1 - b + b * doc_len / max(avg_len, 1e-9))

    def idf(self, token: str) -> float:
        """A term's idf; one no chunk holds gets that of a term in half a chunk (the maximum)."""
        term = self._vocab.get(token)
        if term is None:
            return float(_lucene_idf(self.num_docs, np.zeros(1))[0])
        return float(self._idf[term])

    def _postings(self, token: str) -> tuple[np.ndarray, np.ndarray] | None:
        term = self._vocab.get(token)
        if term is None:
            return None
        start, end = self._offsets[term], self._offsets[term + 1]
        return self._docs[start:end], self._freqs[start:end]

    def scores(
        self, query_tokens: Sequence[str], weights: Sequence[float] | None = None
    ) -> np.ndarray:
        """BM25 of the query against every chunk (a repeated query term counts again); each
        term's part is multiplied by its weight in `weights` (default 1: a follow-up's context
        terms weigh less than its own)."""
        scores = np.zeros(self.num_docs, dtype=np.float64)
        for i, token in enumerate(query_tokens):
            postings = self._postings(token)
            if postings is None:
                continue
            docs, freqs = postings  # each chunk once per term: fancy-index += is safe
            weight = self.idf(token) * (1.0 if weights is None else weights[i])
            scores[docs] += weight * freqs * (self.k1 + 1) / (freqs + self._norm[docs])
        return scores

    def coverage(
        self,
        query_tokens: Sequence[str],
        docs: np.ndarray,
        weights: Sequence[float] | None = None,
    ) -> np.ndarray:
        """For each of `docs`, the share of the query's idf mass its chunk contains (0 to 1),
        each term's idf multiplied by its weight in `weights` (default 1; a repeated term
        counts once, with its first weight).

        Unlike a BM25 score it means the same in every knowledge base, so a threshold on it
        does too: 1.0 is every query term present, 0.0 none."""
        first: dict[str, float] = {}
        for i, token in enumerate(query_tokens):
            first.setdefault(token, 1.0 if weights is None else weights[i])
        unique = list(first)
        mass = np.array([self.idf(token) * first[token] for token in unique])
        found = np.zeros((len(docs), len(unique)), dtype=bool)
        for column, token in enumerate(unique):
            postings = self._postings(token)
            if postings is not None:
                found[:, column] = np.isin(docs, postings[0])
        total = mass.sum()
        return found @ mass / total if total > 0 else np.zeros(len(docs))


def _lucene_idf(num_docs: int, num_with: np.ndarray) -> np.ndarray:
    """log(1 + (N - n + 0.5) / (n + 0.5)): positive for every term (Lucene's BM25 idf)."""
    return np.log1p((num_docs - num_with + 0.5) / (num_with + 0.5))
