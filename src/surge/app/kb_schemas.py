"""The knowledge-base API's wire types (pydantic, at the HTTP edge only)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from surge.app.kb.cite import Citation, Segment, UnverifiedCitation
from surge.app.kb.index import Hit, Passage, SearchMode
from surge.app.kb.split import DEFAULT_CHUNK_SIZE, DEFAULT_OVERLAP, MIN_CHUNK_SIZE
from surge.app.kb.store import DocumentStatus, Visibility

MAX_CHUNK_SIZE = 8000
MAX_QUESTION_CHARS = 10_000


def _as_utc(value: datetime) -> datetime:
    """The knowledge-base tables keep UTC; SQLite returns it without a zone."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


UTCTime = Annotated[datetime, AfterValidator(_as_utc)]


class KBIn(BaseModel):
    """A new knowledge base. `embedding_model`: None picks the service's first embedding model
    (or, when it serves none, keyword search only); "" asks for keyword search only."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=10_000)
    visibility: Visibility = Visibility.PRIVATE
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    overlap: int = Field(default=DEFAULT_OVERLAP, ge=0)
    embedding_model: str | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _overlap_fits(self) -> KBIn:
        if self.overlap > self.chunk_size // 2:
            raise ValueError("overlap must be at most half the chunk size")
        return self


class KBPatch(BaseModel):
    """What can change after creation (splitting and the embedding model can't: they are what
    the stored chunks were made with)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=10_000)
    visibility: Visibility | None = None


class KBOut(BaseModel):
    id: int
    name: str
    description: str
    visibility: Visibility
    owner_id: int
    owner: str | None  # the owner's username
    chunk_size: int
    overlap: int
    embedding_model: str  # "": keyword search only
    created_at: UTCTime
    num_documents: int
    can_write: bool  # may upload, re-index and delete documents
    can_manage: bool  # may rename, change visibility, delete the knowledge base


class DocumentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kb_id: int
    file_name: str
    content_sha256: str
    size_bytes: int
    status: DocumentStatus
    progress: float  # 0 to 1
    error: str | None
    num_chunks: int
    created_at: UTCTime


class Uploaded(BaseModel):
    file_name: str  # as sent
    duplicate: bool  # the knowledge base already held these bytes: `document` is that one
    document: DocumentOut


class Rejected(BaseModel):
    file_name: str
    code: str  # unsupported_type | too_large | unreadable
    message: str


class UploadOut(BaseModel):
    """Each file of an upload: queued (or found to be a duplicate), or rejected and why."""

    uploaded: list[Uploaded]
    rejected: list[Rejected]


class SearchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    top_k: int = Field(default=5, ge=1, le=50)
    mode: SearchMode = SearchMode.HYBRID


class PassageOut(BaseModel):
    """A chunk and where it came from; `chunk_id` is valid until its document is re-indexed."""

    chunk_id: int
    document_id: int
    file_name: str
    page: int | None
    heading: str | None
    text: str

    @classmethod
    def of(cls, passage: Passage) -> PassageOut:
        return cls(
            chunk_id=passage.chunk_id,
            document_id=passage.document_id,
            file_name=passage.file_name,
            page=passage.page,
            heading=passage.heading,
            text=passage.text,
        )


class HitOut(BaseModel):
    rank: int
    passage: PassageOut
    hybrid: float  # the fused score hybrid mode orders by
    bm25: float  # raw BM25, 0 when no query word matches
    vector: float  # cosine similarity, -1 to 1 (0 in a keyword-only knowledge base)
    coverage: float  # share of the query's idf mass in the passage, 0 to 1
    bm25_rank: int | None
    vector_rank: int | None
    rerank: float | None = None  # the service's rerank score, when it serves a rerank model
    relevant: bool  # clears a relevance threshold: an answer would be given this passage

    @classmethod
    def of(cls, rank: int, hit: Hit, relevant: bool) -> HitOut:
        return cls(
            rank=rank,
            passage=PassageOut.of(hit.passage),
            hybrid=hit.hybrid,
            bm25=hit.bm25,
            vector=hit.vector,
            coverage=hit.coverage,
            bm25_rank=hit.bm25_rank,
            vector_rank=hit.vector_rank,
            rerank=hit.rerank,
            relevant=relevant,
        )


class SearchOut(BaseModel):
    query: str
    mode: SearchMode
    embedding_model: str
    min_vector: float  # the relevance thresholds: either one passed makes a hit relevant
    min_coverage: float
    hits: list[HitOut]


class AskIn(BaseModel):
    """A question to one knowledge base; `stream` false answers with one JSON object."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    model: str | None = Field(default=None, max_length=200)
    top_k: int = Field(default=5, ge=1, le=20)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    stream: bool = True

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the question is empty")
        return v


class NumberedPassage(PassageOut):
    number: int  # what the answer cites it as: [number]


class SegmentOut(BaseModel):
    """A piece of an answer: text, a verified citation (a link to passage `number`), or an
    unverified one (a number no passage has: shown as plain text)."""

    type: Literal["text", "citation", "unverified"]
    text: str
    number: int | None = None

    @classmethod
    def of(cls, segment: Segment) -> SegmentOut:
        if isinstance(segment, Citation):
            return cls(type="citation", text=f"[{segment.number}]", number=segment.number)
        if isinstance(segment, UnverifiedCitation):
            return cls(type="unverified", text=segment.text, number=segment.number)
        return cls(type="text", text=segment.text)


class Sources(BaseModel):
    """What an answer was given and what it cited; saved with a conversation's message."""

    found: bool  # False: nothing relevant was retrieved, the answer says so
    passages: list[NumberedPassage]
    segments: list[SegmentOut]
    cited: list[int]  # the verified citation numbers, in order of first use


class AskOut(Sources):
    """A non-streamed answer."""

    answer: str
    model: str | None  # None when nothing relevant was found (the model wasn't asked)
    usage: dict[str, int] | None


class KbIdsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kb_ids: list[int] = Field(max_length=20)


class ConversationKnowledge(BaseModel):
    """A conversation's knowledge: the knowledge bases it answers from, the files attached to
    it (file chat), and the sources of its answers by message id."""

    kb_ids: list[int]
    files: list[DocumentOut]
    sources: dict[int, Sources]


class EmbeddingModelsOut(BaseModel):
    models: list[str]
