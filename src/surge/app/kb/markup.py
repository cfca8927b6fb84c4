"""HTML and Markdown → sections: visible text, with headings opening sections."""

from __future__ import annotations

import re
from collections.abc import Iterator

from bs4 import BeautifulSoup, NavigableString, Tag

from surge.app.kb.sections import HeadingPath, Section, clean_text

_HTML_SKIP = frozenset(
    "script style noscript template head svg canvas iframe object embed button select "
    "textarea input nav".split()
)
_HTML_BLOCK = frozenset(
    "p div section article main aside header footer li ul ol dl dt dd tr table blockquote "
    "pre figure figcaption form address br hr".split()
)
_HTML_HEADINGS = {f"h{level}": level for level in range(1, 7)}


def parse_html(text: str) -> list[Section]:
    """Visible text; h1-h6 start sections, block elements end paragraphs."""
    soup = BeautifulSoup(text, "html.parser")
    headings = HeadingPath()
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    if title:
        headings.push(0, title)
    sections: list[Section] = []
    parts: list[str] = []

    def flush() -> None:
        body = clean_text(_join_html_text(parts))
        if body:
            sections.append(Section(body, heading=headings.current))
        parts.clear()

    for event, node in _html_events(soup.body or soup):
        if event == "heading":
            flush()
            headings.push(_HTML_HEADINGS[node.name], node.get_text(" ", strip=True))
        elif event == "break":
            parts.append("\n\n")
        else:
            parts.append(str(node))
    flush()
    return sections


def _html_events(root: Tag) -> Iterator[tuple[str, Tag | NavigableString]]:
    """("text", s), ("break", tag) around blocks and ("heading", h) in document order.

    Iterative: a page nested ten thousand deep must not overflow the stack."""
    stack: list[tuple[bool, Tag | NavigableString]] = [(False, child) for child in root.children]
    stack.reverse()
    while stack:
        closing, node = stack.pop()
        if closing:
            yield "break", node  # type: ignore[misc]
            continue
        if isinstance(node, NavigableString):
            if type(node) is NavigableString:  # not a Comment, CData, Doctype...
                yield "text", node
            continue
        if not isinstance(node, Tag) or node.name in _HTML_SKIP or _html_hidden(node):
            continue
        if node.name in _HTML_HEADINGS:
            yield "heading", node
            continue
        if node.name in _HTML_BLOCK:
            yield "break", node
            stack.append((True, node))
        stack.extend((False, child) for child in reversed(list(node.children)))


def _html_hidden(tag: Tag) -> bool:
    if tag.has_attr("hidden") or tag.get("aria-hidden") == "true":
        return True
    style = str(tag.get("style", "")).replace(" ", "").lower()
    return "display:none" in style or "visibility:hidden" in style


def _join_html_text(parts: list[str]) -> str:
    """HTML whitespace collapses to one space; the paragraph breaks we inserted survive."""
    text = "".join(parts)
    paragraphs = (" ".join(block.split()) for block in text.split("\n\n"))
    return "\n\n".join(p for p in paragraphs if p)


_MD_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_MD_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_MD_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def parse_markdown(text: str) -> list[Section]:
    """ATX (`# Title`) and setext (underlined) headings start sections; fenced code is body."""
    sections: list[Section] = []
    headings = HeadingPath()
    lines: list[str] = []
    fence: str | None = None

    def flush() -> None:
        body = clean_text("\n".join(lines))
        if body:
            sections.append(Section(body, heading=headings.current))
        lines.clear()

    for line in text.replace("\r\n", "\n").split("\n"):
        fence_match = _MD_FENCE.match(line)
        if fence_match:
            marker = fence_match.group(1)[0] * 3
            fence = marker if fence is None else (None if marker == fence else fence)
        elif fence is None:
            atx = _MD_ATX.match(line)
            setext = _MD_SETEXT.match(line)
            if atx:
                flush()
                headings.push(len(atx.group(1)), atx.group(2))
                continue
            if setext and lines and lines[-1].strip() and not _MD_SETEXT.match(lines[-1]):
                title = lines.pop()
                flush()
                headings.push(1 if setext.group(1)[0] == "=" else 2, title.strip())
                continue
        lines.append(line)
    flush()
    return sections
