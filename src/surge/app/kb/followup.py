"""Follow-up questions: what a knowledge-base conversation searches for.

"What about its price?" alone finds nothing: it names neither the product nor the document.
`conversation_query` turns the conversation's user turns into a `SearchQuery`: the latest
question, plus, when it reads as a follow-up, the earlier user turns as context. Retrieval
weighs the context below the question (`KnowledgeIndex.search`: the context's BM25 terms count
`context_weight` as much as the question's, in the score and in the keyword coverage; the query
vector is the question's embedding plus `context_weight` times the context's), so the question
still decides between passages of the same topic. A standalone question is searched alone, as
before: a new topic isn't dragged back to the old one.

A follow-up is a question with a pronoun or demonstrative that points back ("it", "that",
"它", "那"), one that opens like a continuation ("and ...", "what about ...", "那...", "...呢"),
or a short one (at most `MAX_FOLLOW_UP_TERMS` keyword terms) that names nothing (no number, code or
capitalized name: "Who is Osei Boateng?" stands alone). Assistant answers are left out: they
are long, and their words would outweigh the user's. Measured on the golden set's follow-up
cases in tests/app_kb (the test prints the table).

The app may also ask the chat model to rewrite a follow-up as a standalone query (Open WebUI's
and Chatchat's way; an admin setting, off by default): `rewrite_messages` builds that request,
`clean_rewrite` checks the answer. Any failure keeps this module's query."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from surge.app.kb.bm25 import tokenize

CONTEXT_WEIGHT = 0.5  # of the earlier turns against the latest question
MAX_CONTEXT_TURNS = 2  # earlier user turns kept as context
MAX_FOLLOW_UP_TERMS = 2  # a question with this few keyword terms can't stand alone
MAX_REWRITE_CHARS = 300  # a longer "rewrite" is an answer, not a query

_POINTERS_EN = frozenset(
    "it its it's itself they them their theirs this that these those he him his she her "
    "there one ones same former latter above".split()
)
_OPENERS_EN = re.compile(r"^\s*(and|also|so|then|but|what about|how about|what of)\b", re.I)
_POINTERS_ZH = re.compile(r"它|他|她|这|那|其|该|此|上述|前者|后者")
_OPENERS_ZH = re.compile(r"^\s*(那|那么|还有|另外|以及|并且|而且)|呢\s*[？?]?\s*$")
_WORDS = re.compile(r"[a-z']+")
_NAMED = re.compile(r"\d|[A-Z]{2,}|(?<=\s)[A-Z][a-z]")  # a number, code or name stands alone


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """What retrieval searches for: the question, and the earlier turns it follows up on."""

    text: str  # the latest question (or its standalone rewrite)
    context: str = ""  # earlier user turns; "" for a standalone question
    context_weight: float = CONTEXT_WEIGHT

    @property
    def full_text(self) -> str:
        """Context and question as one text (for a reranker, which takes one query)."""
        return f"{self.context}\n{self.text}" if self.context else self.text


def is_follow_up(question: str) -> bool:
    """Whether `question` needs the conversation to be understood (see the module doc)."""
    words = set(_WORDS.findall(question.lower()))
    if words & _POINTERS_EN or _OPENERS_EN.search(question):
        return True
    if _POINTERS_ZH.search(question) or _OPENERS_ZH.search(question):
        return True
    return len(set(tokenize(question))) <= MAX_FOLLOW_UP_TERMS and not _NAMED.search(question)


def conversation_query(user_turns: Sequence[str]) -> SearchQuery:
    """The search for the last of `user_turns` (oldest first), with the earlier ones as
    context when it is a follow-up."""
    if not user_turns:
        return SearchQuery("")
    question = user_turns[-1]
    earlier = [turn for turn in user_turns[:-1] if turn.strip()][-MAX_CONTEXT_TURNS:]
    if not earlier or not is_follow_up(question):
        return SearchQuery(question)
    return SearchQuery(question, "\n".join(earlier))


REWRITE_INSTRUCTIONS = (
    "Rewrite the user's last question as one standalone search query for a document search: "
    "resolve pronouns and references from the earlier questions, keep names, codes and numbers, "
    "use the question's language. Reply with the query only, no explanation."
)


def rewrite_messages(user_turns: Sequence[str]) -> list[dict[str, str]]:
    """The chat request that asks a model to rewrite the last turn as a standalone query."""
    earlier = user_turns[:-1][-MAX_CONTEXT_TURNS:]
    lines = [f"Earlier question: {turn}" for turn in earlier]
    lines.append(f"Last question: {user_turns[-1]}")
    return [
        {"role": "system", "content": REWRITE_INSTRUCTIONS},
        {"role": "user", "content": "\n".join(lines)},
    ]


def clean_rewrite(answer: str) -> str | None:
    """The model's rewrite as a query, or None when it isn't one (empty, or too long)."""
    text = answer.strip().strip('"“”').strip()
    for prefix in ("Query:", "Standalone query:", "查询："):
        text = text.removeprefix(prefix).strip()
    if not text or len(text) > MAX_REWRITE_CHARS:
        return None
    return text
