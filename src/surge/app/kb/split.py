"""Sections → chunks of at most `chunk_size` characters, for Chinese and English alike.

A section (one heading, one page) is cut at the largest boundary that makes its pieces fit:
paragraphs, then lines, then sentence ends (。！？；!?; and a period followed by a space), then
clause marks (，、：,:), then spaces, and only then a hard cut. The pieces are packed greedily
into chunks; each chunk after the first of a section starts with the previous chunk's last
`overlap` characters, begun at a sentence or word boundary where the tail holds one. Sizes are
in characters: a Chinese character carries about as much as an English word's 4-5 letters, so
the same default serves both. Chunks never cross sections, so each keeps its page and heading.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from surge.app.kb.sections import Section

DEFAULT_CHUNK_SIZE = 500
DEFAULT_OVERLAP = 80
MIN_CHUNK_SIZE = 50

# Each level ends a piece right after a match; the separator stays with the piece before it,
# so the pieces of a text concatenate back to it exactly.
_LEVELS = (
    re.compile(r"\n[ \t]*\n\s*"),  # paragraphs
    re.compile(r"\n"),  # lines (lists, tables, PDF lines)
    re.compile(r"[。！？；!?;…]+[”’\"'」』）)\]]*\s*|\.[”’\"')\]]*\s+"),  # sentence ends
    re.compile(r"[，、：,:]\s*"),  # clauses
    re.compile(r"\s+"),  # words
)
_TAIL_BOUNDARIES = (_LEVELS[2], _LEVELS[1], _LEVELS[3], _LEVELS[4])


@dataclass(frozen=True, slots=True)
class SplitConfig:
    """Chunk size and overlap in characters (per knowledge base)."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    overlap: int = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        if self.chunk_size < MIN_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be at least {MIN_CHUNK_SIZE} characters")
        if not 0 <= self.overlap <= self.chunk_size // 2:
            raise ValueError("overlap must be between 0 and half the chunk size")


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a document, with where it came from."""

    ordinal: int  # its position among the document's chunks
    text: str
    file_name: str
    page: int | None
    heading: str | None


def split_sections(
    sections: Iterable[Section], file_name: str, config: SplitConfig | None = None
) -> list[Chunk]:
    """All chunks of a document, numbered in reading order."""
    config = config or SplitConfig()
    chunks: list[Chunk] = []
    for section in sections:
        for text in split_text(section.text, config):
            chunks.append(Chunk(len(chunks), text, file_name, section.page, section.heading))
    return chunks


def split_text(text: str, config: SplitConfig | None = None) -> list[str]:
    """The chunks of one text: each at most `chunk_size` characters, stripped, none empty."""
    config = config or SplitConfig()
    # Pieces leave room for a full overlap, so every chunk after the first can have one.
    pieces = _pieces(text, config.chunk_size - config.overlap, 0)
    return [chunk.strip() for chunk in _pack(pieces, config) if chunk.strip()]


def _cut_after(text: str, pattern: re.Pattern[str]) -> list[str]:
    """`text` cut right after each match of `pattern` (separators kept on the left)."""
    pieces, start = [], 0
    for match in pattern.finditer(text):
        if match.end() > start:
            pieces.append(text[start : match.end()])
            start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _pieces(text: str, limit: int, level: int) -> Iterator[tuple[str, int]]:
    """Pieces of at most `limit` characters, cut at the largest boundary that suffices, each
    with the length of the largest unit (paragraph, line, sentence...) that starts with it."""
    if len(text) <= limit:
        yield text, len(text)
        return
    if level == len(_LEVELS):  # no boundary left: a hard cut
        for start in range(0, len(text), limit):
            yield text[start : start + limit], len(text) - start
        return
    for piece in _cut_after(text, _LEVELS[level]):
        for i, (sub, unit_len) in enumerate(_pieces(piece, limit, level + 1)):
            yield sub, (len(piece) if i == 0 else unit_len)


def _pack(pieces: Iterable[tuple[str, int]], config: SplitConfig) -> list[str]:
    """Greedy packing: a chunk takes pieces while they fit, and a chunk at least half full
    ends early rather than take the start of a unit it can't hold whole (so paragraphs and
    sentences begin chunks where they can). Each next chunk starts with an overlap."""
    size = config.chunk_size
    chunks: list[str] = []
    current = ""
    has_new = False  # whether `current` holds more than the previous chunk's overlap
    for piece, unit_len in pieces:
        full = len(current) + len(piece) > size
        early = len(current) >= size // 2 and len(current) + unit_len > size
        if has_new and (full or early):
            chunks.append(current)
            current, has_new = _tail(current, min(config.overlap, size - len(piece))), False
        current += piece
        has_new = has_new or bool(piece.strip())
    if has_new:
        chunks.append(current)
    return chunks


def _tail(text: str, size: int) -> str:
    """The last `size` characters or fewer, begun after a sentence end if the tail holds one,
    else after a clause mark or a space, else wherever `size` falls."""
    body = text.rstrip()  # the separator after the last piece stays, outside the count
    separator = text[len(body) :]
    if size <= 0 or not body:
        return ""
    tail = body[-size:]
    if len(tail) == len(body):
        return tail + separator
    for boundary in _TAIL_BOUNDARIES:
        match = boundary.search(tail)
        if match and match.end() < len(tail):
            return tail[match.end() :] + separator
    return tail + separator
