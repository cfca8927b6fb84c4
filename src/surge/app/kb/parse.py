"""Text out of uploaded files: txt, md, pdf, docx, html → sections (text, page, heading).

The type comes from the content where the content is unambiguous (a PDF header, a zip holding
`word/document.xml`), otherwise from the extension; anything else is refused with a message a
user can act on. Limits guard against huge files and decompression bombs: the file's size, a
docx's declared unpacked size (checked before anything is inflated), a PDF's page count, and
the extracted text's length (pypdf also caps each inflated stream itself)."""

from __future__ import annotations

import codecs
import enum
import io
import re
import zipfile
from dataclasses import dataclass
from typing import BinaryIO

from surge.app.kb.markup import parse_html, parse_markdown
from surge.app.kb.sections import HeadingPath, Section, clean_text

SNIFF_BYTES = 2048  # of a file's start, enough to tell its type
READ_CHUNK_BYTES = 256 * 1024  # a file is scanned in chunks of this size, never read whole


class ParseError(ValueError):
    """The file can't be read as the type it is (corrupt, encrypted, undecodable)."""


class UnsupportedFileType(ParseError):
    """Not one of txt, md, pdf, docx, html."""


class FileTooLarge(ParseError):
    """Over a size limit: the file, its unpacked contents, its pages or its text."""


class FileType(str, enum.Enum):
    TXT = "txt"
    MD = "md"
    PDF = "pdf"
    DOCX = "docx"
    HTML = "html"


_EXTENSIONS = {
    "txt": FileType.TXT,
    "text": FileType.TXT,
    "md": FileType.MD,
    "markdown": FileType.MD,
    "pdf": FileType.PDF,
    "docx": FileType.DOCX,
    "html": FileType.HTML,
    "htm": FileType.HTML,
}
SUPPORTED = ".txt, .md, .pdf, .docx, .html"


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """How much one file may hold; every limit fails with `FileTooLarge`."""

    max_bytes: int = 100 * 1024 * 1024  # the uploaded file
    max_unpacked_bytes: int = 400 * 1024 * 1024  # a docx's members, as their headers declare
    max_pages: int = 20_000  # a PDF
    max_chars: int = 50_000_000  # the extracted text


def parse_document(
    file_name: str, data: bytes, *, limits: ParseLimits | None = None
) -> list[Section]:
    """The sections of an uploaded file, in reading order; empty sections are dropped."""
    limits = limits or ParseLimits()
    if len(data) > limits.max_bytes:
        raise FileTooLarge(f"{len(data)} bytes is over the limit of {limits.max_bytes}")
    kind = detect_type(file_name, data)
    budget = _Budget(limits.max_chars)
    if kind is FileType.PDF:
        return _parse_pdf(data, limits, budget)
    if kind is FileType.DOCX:
        return _parse_docx(data, limits, budget)
    text = budget.take(_decode(data))
    if kind is FileType.HTML:
        return parse_html(text)
    if kind is FileType.MD:
        return parse_markdown(text)
    cleaned = clean_text(text)
    return [Section(cleaned)] if cleaned else []


def detect_type(file_name: str, data: bytes) -> FileType:
    """PDF and docx by their content, text types by extension (or sniffed); else refused."""
    return detect_file_type(file_name, io.BytesIO(data))


def detect_file_type(file_name: str, file: BinaryIO) -> FileType:
    """`detect_type` of a seekable file, read in chunks (an upload is never read whole), left
    at its start."""
    try:
        file.seek(0)
        head = file.read(SNIFF_BYTES)
        has_nul = b"\x00" in head
        while not has_nul and (chunk := file.read(READ_CHUNK_BYTES)):
            has_nul = b"\x00" in chunk
        file.seek(0)
        return _detect(file_name, head, has_nul, file)
    finally:
        file.seek(0)


def _detect(file_name: str, head: bytes, has_nul: bool, file: BinaryIO) -> FileType:
    ext = file_name.replace("\\", "/").rsplit("/", 1)[-1]
    ext = ext.rsplit(".", 1)[-1].lower() if "." in ext else ""
    claimed = _EXTENSIONS.get(ext)
    if b"%PDF-" in head[:1024]:
        return FileType.PDF
    if head.startswith(b"PK\x03\x04"):
        if _is_docx(file):
            return FileType.DOCX
        raise UnsupportedFileType(f"{file_name!r} is a zip archive, not a .docx ({SUPPORTED})")
    if _looks_binary(head, has_nul):
        raise UnsupportedFileType(f"{file_name!r} is not a text document ({SUPPORTED})")
    if claimed in (FileType.PDF, FileType.DOCX):
        raise ParseError(f"{file_name!r} is named .{ext} but is not a valid {ext.upper()} file")
    if claimed is not None:
        return claimed
    if ext:
        raise UnsupportedFileType(f".{ext} files are not supported ({SUPPORTED})")
    return (
        FileType.HTML
        if head.lstrip().lower().startswith((b"<!doctype html", b"<html"))
        else FileType.TXT
    )


# Magic numbers of common binary files that are neither PDF nor docx.
_BINARY_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"\x7fELF", b"MZ", b"\x1f\x8b", b"BZh")


class _Budget:
    """Counts extracted characters against `max_chars`."""

    def __init__(self, max_chars: int) -> None:
        self.left = max_chars
        self.max_chars = max_chars

    def take(self, text: str) -> str:
        self.left -= len(text)
        if self.left < 0:
            raise FileTooLarge(f"the text is longer than {self.max_chars} characters")
        return text


def _looks_binary(head: bytes, has_nul: bool) -> bool:
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return False  # UTF-16 text is full of NUL bytes
    return head.startswith(_BINARY_MAGIC) or has_nul


def _decode(data: bytes) -> str:
    """UTF-8 (with or without BOM), UTF-16 with a BOM, or GB18030 (common for Chinese files)."""
    utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    for encoding in ("utf-16",) if utf16 else ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise ParseError(
        "the text is not valid UTF-16" if utf16 else "the text is neither UTF-8 nor GB18030"
    )


def _is_docx(file: BinaryIO) -> bool:
    try:
        with zipfile.ZipFile(file) as zf:
            return "word/document.xml" in zf.namelist()
    except zipfile.BadZipFile:
        return False


def _parse_pdf(data: bytes, limits: ParseLimits, budget: _Budget) -> list[Section]:
    from pypdf import PdfReader  # a heavy import, needed only here
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ParseError("the PDF is encrypted with a password")
        num_pages = len(reader.pages)
        if num_pages > limits.max_pages:
            raise FileTooLarge(f"{num_pages} pages is over the limit of {limits.max_pages}")
        headings = _pdf_outline(reader)
        sections = []
        heading = None
        for index, page in enumerate(reader.pages):
            heading = headings.get(index, heading)
            text = clean_text(budget.take(page.extract_text() or ""))
            if text:
                sections.append(Section(text, page=index + 1, heading=heading))
        return sections
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, ParseError):
            raise
        raise ParseError(f"cannot read the PDF: {exc}") from exc


def _pdf_outline(reader) -> dict[int, str]:  # type: ignore[no-untyped-def]
    """The outline's deepest title starting on each page (0-based); {} if it has none."""
    starts: dict[int, str] = {}
    path = HeadingPath()

    def walk(items: list, level: int) -> None:  # type: ignore[type-arg]
        for item in items:
            if isinstance(item, list):
                walk(item, level + 1)
                continue
            page = reader.get_destination_page_number(item)
            path.push(level, str(item.title))
            if page is not None and path.current:
                starts[page] = path.current

    try:
        walk(reader.outline, 1)
    except Exception:  # a broken outline costs the headings, not the text
        return {}
    return starts


def _parse_docx(data: bytes, limits: ParseLimits, budget: _Budget) -> list[Section]:
    import docx  # python-docx: a heavy import, needed only here
    from docx.table import Table

    # The declared sizes are binding: zipfile stops inflating a member at its declared size
    # (and fails its CRC if the data goes on), so a lying header can't smuggle in more.
    with zipfile.ZipFile(io.BytesIO(data)) as zf:  # headers first: nothing inflated yet
        unpacked = sum(info.file_size for info in zf.infolist())
    if unpacked > limits.max_unpacked_bytes:
        raise FileTooLarge(
            f"the docx unpacks to {unpacked} bytes, over the limit of {limits.max_unpacked_bytes}"
        )
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # python-docx raises a variety (KeyError, lxml errors...)
        raise ParseError(f"cannot read the docx: {exc}") from exc
    sections: list[Section] = []
    headings = HeadingPath()
    lines: list[str] = []

    def flush() -> None:
        text = clean_text("\n\n".join(lines))
        if text:
            sections.append(Section(text, heading=headings.current))
        lines.clear()

    for block in document.iter_inner_content():
        text = _table_text(block) if isinstance(block, Table) else block.text.strip()
        budget.take(text)
        level = None if isinstance(block, Table) else _docx_heading_level(block)
        if level is not None and text:
            flush()
            headings.push(level, text)
        elif text:
            lines.append(text)
    flush()
    return sections


_DOCX_HEADING = re.compile(r"^(?:heading|标题)\s*(\d)$", re.IGNORECASE)


def _docx_heading_level(paragraph) -> int | None:  # type: ignore[no-untyped-def]
    """1-9 for "Heading N" (or the Chinese "标题 N"), 0 for "Title", None for body text."""
    try:
        name = (paragraph.style.name or "").strip()
    except (KeyError, AttributeError, ValueError):
        return None
    if name.lower() in ("title", "标题"):
        return 0
    match = _DOCX_HEADING.match(name)
    return int(match.group(1)) if match else None


def _table_text(table) -> str:  # type: ignore[no-untyped-def]
    """One line per row, cells joined by " | " (a merged cell appears once)."""
    rows = []
    for row in table.rows:
        cells: list[str] = []
        for cell in row.cells:
            text = " ".join(cell.text.split())
            if text and (not cells or cells[-1] != text):
                cells.append(text)
        if cells:
            rows.append(" | ".join(cells))
    return "\n".join(rows)
