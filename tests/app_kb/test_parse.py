"""Text extraction: each supported type, its structure (pages, headings), and refusals."""

from __future__ import annotations

import io
import zipfile

import docx
import pytest
from pypdf import PdfReader, PdfWriter

from surge.app.kb.parse import (
    FileTooLarge,
    FileType,
    ParseError,
    ParseLimits,
    Section,
    UnsupportedFileType,
    detect_type,
    parse_document,
)


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF, one Helvetica text line per input line (no PDF library writes
    text, and reportlab isn't a dependency)."""

    def escape(line: str) -> str:
        return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    first_page = 4
    kids = " ".join(f"{first_page + 2 * i} 0 R" for i in range(len(pages)))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        ops = " ".join(f"({escape(line)}) Tj T*" for line in text.split("\n"))
        stream = f"BT /F1 12 Tf 16 TL 72 720 Td {ops} ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents "
            f"{first_page + 2 * i + 1} 0 R /Resources << /Font << /F1 3 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\n" % (len(objects) + 1))
    out.write(b"startxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def with_outline(pdf: bytes, items: list[tuple[str, int]]) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    for title, page in items:
        writer.add_outline_item(title=title, page_number=page)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_docx() -> bytes:
    document = docx.Document()
    document.add_heading("Employee Handbook", 0)
    document.add_paragraph("Welcome to the company.")
    document.add_heading("Leave", 1)
    document.add_paragraph("Annual leave is 20 days.")
    document.add_heading("Sick leave", 2)
    document.add_paragraph("Tell your manager before 10 am.")
    document.add_heading("报销", 1)
    document.add_paragraph("发票需在三十天内提交。")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Item", "Limit"
    table.cell(1, 0).text, table.cell(1, 1).text = "Hotel", "180 EUR"
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def test_plain_text_utf8_and_gb18030() -> None:
    text = "第一段。\r\n\r\n\r\n\r\nSecond paragraph.  \n"
    assert parse_document("a.txt", text.encode()) == [Section("第一段。\n\nSecond paragraph.")]
    assert parse_document("a.txt", "中文文件".encode("gb18030")) == [Section("中文文件")]
    assert parse_document("a.txt", "\ufeffBOM".encode()) == [Section("BOM")]
    assert parse_document("a.txt", "Windows 记事本".encode("utf-16")) == [Section("Windows 记事本")]
    assert parse_document("empty.txt", b"  \n ") == []


def test_markdown_heading_paths_and_code_fences() -> None:
    md = (
        "Intro line.\n\n# Guide\n\nText A.\n\n## Install\n\nText B.\n\n```sh\n# not a heading\n```\n\n"
        "Setext title\n============\n\nText C.\n\n### 子节 ###\n\n中文。"
    )
    sections = parse_document("guide.md", md.encode())
    assert sections == [
        Section("Intro line."),
        Section("Text A.", heading="Guide"),
        Section("Text B.\n\n```sh\n# not a heading\n```", heading="Guide > Install"),
        Section("Text C.", heading="Setext title"),
        Section("中文。", heading="Setext title > 子节"),
    ]


def test_html_visible_text_with_headings() -> None:
    html = """<!doctype html><html><head><title>Doc</title><style>p{}</style></head><body>
      <nav>Home | About</nav><script>alert('x')</script>
      <p>Lead   paragraph
      text.</p>
      <h1>Alpha</h1><div>One <b>bold</b> word.<p>Nested para.</p>Tail.</div>
      <p hidden>secret</p><div style="display: none">hidden too</div><!-- a comment -->
      <h2>Beta</h2><ul><li>first</li><li>second</li></ul>
      <h1>Gamma</h1><p>中文内容。</p></body></html>"""
    sections = parse_document("page.html", html.encode())
    assert sections == [
        Section("Lead paragraph text.", heading="Doc"),
        Section("One bold word.\n\nNested para.\n\nTail.", heading="Doc > Alpha"),
        Section("first\n\nsecond", heading="Doc > Alpha > Beta"),
        Section("中文内容。", heading="Doc > Gamma"),
    ]
    text = " ".join(section.text for section in sections)
    for invisible in ("alert", "secret", "hidden too", "comment", "Home", "p{}"):
        assert invisible not in text


def test_html_nested_deeply_does_not_overflow() -> None:
    depth = 3000
    html = "<html><body>" + "<div>" * depth + "deep text" + "</div>" * depth + "</body></html>"
    assert parse_document("deep.html", html.encode()) == [Section("deep text")]


def test_docx_headings_and_tables() -> None:
    sections = parse_document("handbook.docx", make_docx())
    assert sections == [
        Section("Welcome to the company.", heading="Employee Handbook"),
        Section("Annual leave is 20 days.", heading="Employee Handbook > Leave"),
        Section(
            "Tell your manager before 10 am.", heading="Employee Handbook > Leave > Sick leave"
        ),
        Section(
            "发票需在三十天内提交。\n\nItem | Limit\nHotel | 180 EUR",
            heading="Employee Handbook > 报销",
        ),
    ]


def test_pdf_pages_and_outline_headings() -> None:
    pdf = make_pdf(["Page one (intro).\nSecond line.", "", "Page three text."])
    sections = parse_document("report.pdf", pdf)
    assert [(s.page, s.heading) for s in sections] == [(1, None), (3, None)]
    assert "Page one (intro)." in sections[0].text and "Second line." in sections[0].text
    assert sections[1].text == "Page three text."

    outlined = with_outline(pdf, [("Introduction", 0), ("Results", 2)])
    assert [s.heading for s in parse_document("report.pdf", outlined)] == [
        "Introduction",
        "Results",
    ]


def test_type_detection_by_content_then_extension() -> None:
    pdf, document = make_pdf(["x"]), make_docx()
    assert detect_type("scan.PDF", pdf) is FileType.PDF
    assert detect_type("no_extension", pdf) is FileType.PDF  # content wins
    assert detect_type("renamed.txt", document) is FileType.DOCX
    assert detect_type("notes.markdown", b"# hi") is FileType.MD
    assert detect_type("page.htm", b"<p>x</p>") is FileType.HTML
    assert detect_type("README", b"<!DOCTYPE html><html></html>") is FileType.HTML
    assert detect_type("README", b"plain words") is FileType.TXT
    assert detect_type("C:\\Users\\me\\notes.TXT", b"x") is FileType.TXT


@pytest.mark.parametrize(
    ("name", "data", "error"),
    [
        ("image.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, UnsupportedFileType),
        ("data.bin", b"abc\x00def", UnsupportedFileType),
        ("archive.zip", None, UnsupportedFileType),  # a zip that is not a docx
        ("tool.exe", b"MZ\x90\x00", UnsupportedFileType),
        ("table.csv", b"a,b\n1,2\n", UnsupportedFileType),
        ("fake.pdf", b"just text", ParseError),
        ("broken.pdf", b"%PDF-1.4\nnot really a pdf", ParseError),
        ("latin.txt", b"\x81\x30\xff\x80 invalid in both", ParseError),
        ("utf16.txt", b"\xff\xfe\x41\x00\x00\xd8", ParseError),  # a lone surrogate
        ("utf16.txt", b"\xff\xfe\x41\x42\x43", ParseError),  # truncated UTF-16
    ],
)
def test_refusals_are_clear(name: str, data: bytes | None, error: type[Exception]) -> None:
    if data is None:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("hello.txt", "hi")
        data = out.getvalue()
    with pytest.raises(error) as info:
        parse_document(name, data)
    assert str(info.value)


def test_size_limits() -> None:
    with pytest.raises(FileTooLarge):
        parse_document("big.txt", b"x" * 101, limits=ParseLimits(max_bytes=100))
    with pytest.raises(FileTooLarge):
        parse_document("long.txt", "字字字字字".encode(), limits=ParseLimits(max_chars=4))
    with pytest.raises(FileTooLarge):
        parse_document("long.pdf", make_pdf(["a" * 50]), limits=ParseLimits(max_chars=10))
    with pytest.raises(FileTooLarge):
        parse_document("pages.pdf", make_pdf(["a", "b", "c"]), limits=ParseLimits(max_pages=2))


def test_docx_decompression_bomb_is_refused_before_inflating() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(make_docx())) as source:
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bomb:
            for item in source.infolist():
                bomb.writestr(item, source.read(item))
            bomb.writestr("word/media/padding.bin", b"\x00" * (4 * 1024 * 1024))
    data = out.getvalue()
    assert len(data) < 64 * 1024  # small on disk, 4 MiB unpacked
    with pytest.raises(FileTooLarge, match="unpacks to"):
        parse_document("bomb.docx", data, limits=ParseLimits(max_unpacked_bytes=1024 * 1024))
