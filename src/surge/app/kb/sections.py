"""What parsers produce: sections of text with their page and heading, and the helpers every
parser shares (text cleaning, the open-headings path)."""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEADING_CHARS = 300


@dataclass(frozen=True, slots=True)
class Section:
    """A stretch of text under one heading (and on one page, for a PDF)."""

    text: str
    page: int | None = None  # 1-based, PDFs only
    heading: str | None = None  # the heading path, "Chapter > Section"


def clean_text(text: str) -> str:
    """Unix newlines, no control characters or trailing spaces, at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t\u3000]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")


class HeadingPath:
    """The open headings, outermost first; a heading closes those at its level or deeper."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, str]] = []

    def push(self, level: int, title: str) -> None:
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, " ".join(title.split())[:MAX_HEADING_CHARS]))

    @property
    def current(self) -> str | None:
        return " > ".join(title for _, title in self._stack)[:MAX_HEADING_CHARS] or None
