"""The knowledge-base REST API and knowledge-base chat over real HTTP, against the fake model
service (hashed-bag-of-words embeddings; a chat answer citing [1] and a bogus [9]).

Nothing here waits on time: ingestion is polled until it settles, and "ingestion doesn't
block chat" is checked by state (the document is still processing, its embedding request held
by the fake service, when the chat answer has completed)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import docx
import httpx
import pytest

from surge.app.kb.cite import NOT_FOUND
from tests.app.conftest import STORES, AppFactory
from tests.app.fake_upstream import HOLD_MARKER, FakeUpstream
from tests.app.servers import Browser, events, wait_for

NewBrowser = Callable[[], Browser]

MANUAL = (
    b"# Observatory\n\n## Faults\n\nFault E-4471 means the dome motor has stalled. "
    b"Clear the ice from the rails.\n\n## Visitors\n\nPublic nights are on the first Saturday."
    b"\n\n## Hours\n\nThe library opens at nine."
)  # three chunks: in a two-chunk corpus BM25 gives a term found in one of them idf 0
TEA = b"Green tea is best brewed at eighty degrees Celsius for two minutes."
BREAD = (
    b"<html><body><h1>Sourdough</h1><p>Feed the starter with equal weights of flour and "
    b"water every twelve hours.</p><script>alert(1)</script></body></html>"
)
QUESTION = "What does fault E-4471 mean?"
UNRELATED = "How many moons does Jupiter have?"

pytestmark = STORES  # each test on SQLite and on PostgreSQL


def make_docx() -> bytes:
    document = docx.Document()
    document.add_heading("Holidays", 1)
    document.add_paragraph("Employees receive twenty-five vacation days per year.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


@pytest.fixture
def app_url(make_app: AppFactory) -> str:
    """The app with a rate limit these tests' polling can't reach (the clock never moves)."""
    return make_app(max_requests_per_minute=1_000_000)


@pytest.fixture
def held(fake: FakeUpstream) -> Iterator[FakeUpstream]:
    """The fake service holds embedding requests containing HOLD_MARKER until released."""
    fake.embed_held.clear()
    fake.embed_release.clear()
    try:
        yield fake
    finally:
        fake.embed_release.set()


def user(browsers: NewBrowser, name: str) -> Browser:
    b = browsers()
    assert b.signup(name).status_code == 201
    return b


def new_kb(b: Browser, **fields: object) -> int:
    resp = b.send("POST", "/api/kbs", {"name": "docs", **fields})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def upload(b: Browser, path: str, files: list[tuple[str, bytes]]) -> httpx.Response:
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return b.client.post(path, files=parts, headers=b.headers())


def settled(b: Browser, path: str) -> list[dict[str, object]]:
    """Poll the documents at `path` until none is queued or processing."""
    docs: list[dict[str, object]] = []

    def done() -> bool:
        resp = b.get(path)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        docs[:] = body["files"] if isinstance(body, dict) else body
        return all(d["status"] not in ("queued", "processing") for d in docs)

    wait_for(done, "ingestion to settle")
    return docs


def kb_with_documents(b: Browser, **fields: object) -> int:
    kb = new_kb(b, **fields)
    resp = upload(b, f"/api/kbs/{kb}/documents", [("manual.md", MANUAL), ("tea.txt", TEA)])
    assert resp.status_code == 201, resp.text
    assert {d["status"] for d in settled(b, f"/api/kbs/{kb}/documents")} == {"done"}
    return kb


def answer_text(evs: list[dict[str, object]]) -> str:
    return "".join(str(e["text"]) for e in evs if e["type"] == "delta")


def check_cited_answer(done: dict[str, object], text: str) -> None:
    """[1] is a verified link to the manual's fault passage; [9] stays plain text."""
    assert done["type"] == "done" and done["found"] is True
    first = done["passages"][0]  # type: ignore[index]
    assert first["number"] == 1 and "E-4471" in first["text"]
    assert first["file_name"] == "manual.md" and first["heading"] == "Observatory > Faults"
    segments = done["segments"]
    assert "".join(s["text"] for s in segments) == text  # type: ignore[union-attr]
    assert [s["number"] for s in segments if s["type"] == "citation"] == [1]  # type: ignore[union-attr]
    unverified = [s for s in segments if s["type"] == "unverified"]  # type: ignore[union-attr]
    assert [(s["number"], s["text"]) for s in unverified] == [(9, "[9]")]
    assert done["cited"] == [1]


def test_upload_several_types_search_and_ask(admin: Browser, fake: FakeUpstream) -> None:
    kb = admin.send("POST", "/api/kbs", {"name": "Handbook", "visibility": "shared_read"}).json()
    assert kb["embedding_model"] == "embed-x"  # the service's first embedding model
    assert kb["chunk_size"] == 500 and kb["overlap"] == 80 and kb["owner"] == "alice"
    path = f"/api/kbs/{kb['id']}/documents"
    files = [
        ("manual.md", MANUAL),
        ("tea.txt", TEA),
        ("handbook.docx", make_docx()),
        ("bread.html", BREAD),
        ("setup.exe", b"MZ\x90\x00binary"),
    ]
    resp = upload(admin, path, files)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert [u["file_name"] for u in body["uploaded"]] == [n for n, _ in files[:4]]
    assert [(r["file_name"], r["code"]) for r in body["rejected"]] == [
        ("setup.exe", "unsupported_type")
    ]
    progress = admin.stream("GET", f"{path}/progress")  # one request until all are done
    assert progress[-1] == {"type": "settled"}
    docs = progress[-2]["documents"]
    assert [(d["status"], d["progress"]) for d in docs] == [("done", 1.0)] * 4
    assert all(d["num_chunks"] >= 1 and d["error"] is None for d in docs)

    again = upload(admin, path, [("copy-of-manual.md", MANUAL)]).json()["uploaded"][0]
    assert again["duplicate"] and again["document"]["id"] == docs[0]["id"]
    assert len(admin.get(path).json()) == 4
    assert admin.get(f"/api/kbs/{kb['id']}").json()["num_documents"] == 4

    for query, file_name in [
        ("E-4471", "manual.md"),
        ("vacation days", "handbook.docx"),
        ("sourdough starter", "bread.html"),
    ]:
        found = admin.send("POST", f"/api/kbs/{kb['id']}/search", {"query": query, "top_k": 3})
        top = found.json()["hits"][0]
        assert top["passage"]["file_name"] == file_name and top["relevant"] and top["rank"] == 1
        assert top["bm25"] > 0 and top["bm25_rank"] == 1 and -1 <= top["vector"] <= 1
    bread = admin.send("POST", f"/api/kbs/{kb['id']}/search", {"query": "alert"}).json()
    assert not any("alert" in h["passage"]["text"] for h in bread["hits"])  # scripts dropped
    vector = {"query": "E-4471", "mode": "vector", "top_k": 2}
    hits = admin.send("POST", f"/api/kbs/{kb['id']}/search", vector).json()["hits"]
    assert len(hits) == 2 and hits[0]["vector_rank"] == 1

    evs = admin.stream("POST", f"/api/kbs/{kb['id']}/ask", {"question": QUESTION})
    assert evs[0] == {"type": "start", "user_message_id": None}
    states = [e["state"] for e in evs if e["type"] == "status"]
    assert states == ["retrieving", "waiting", "generating"]
    check_cited_answer(evs[-1], answer_text(evs))
    assert evs[-1]["model"] == "chat-a" and evs[-1]["usage"]["completion_tokens"] == 3  # type: ignore[index]
    sent = fake.requests[-1]["messages"]
    assert (
        sent[0]["role"] == "system"
        and "[1] (manual.md, Observatory > Faults)" in sent[1]["content"]
    )  # type: ignore[index]

    before = len(fake.requests)
    evs = admin.stream("POST", f"/api/kbs/{kb['id']}/ask", {"question": UNRELATED})
    assert answer_text(evs) == NOT_FOUND["en"]
    assert evs[-1]["found"] is False and evs[-1]["passages"] == [] and evs[-1]["model"] is None
    assert len(fake.requests) == before  # the model was not asked

    plain = admin.send("POST", f"/api/kbs/{kb['id']}/ask", {"question": QUESTION, "stream": False})
    assert plain.status_code == 200
    check_cited_answer({"type": "done", **plain.json()}, plain.json()["answer"])
    usage = {u["username"]: u for u in admin.get("/api/admin/users").json()}["alice"]
    assert usage["num_requests"] == 2 and usage["num_tokens_out"] == 6  # two asks reached it


def test_cancel_reindex_and_delete_a_document(admin: Browser, held: FakeUpstream) -> None:
    kb = new_kb(admin)
    path = f"/api/kbs/{kb}/documents"
    text = f"{HOLD_MARKER} The refractor telescope needs collimation every spring.".encode()
    document = upload(admin, path, [("telescope.txt", text)]).json()["uploaded"][0]["document"]
    doc_path = f"{path}/{document['id']}"
    wait_for(held.embed_held.is_set, "the document's embedding request")
    assert admin.get(doc_path).json()["status"] == "processing"
    assert admin.send("POST", f"{doc_path}/reindex").status_code == 409  # busy
    cancelled = admin.send("POST", f"{doc_path}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert admin.send("POST", f"{doc_path}/cancel").status_code == 409  # nothing to cancel
    held.embed_release.set()

    requeued = admin.send("POST", f"{doc_path}/reindex")
    assert requeued.status_code == 202 and requeued.json()["status"] == "queued"
    assert settled(admin, path)[0]["status"] == "done"
    query = {"query": "telescope collimation"}
    hits = admin.send("POST", f"/api/kbs/{kb}/search", query).json()["hits"]
    assert hits and hits[0]["passage"]["document_id"] == document["id"]
    passage = admin.get(f"/api/kbs/{kb}/passages/{hits[0]['passage']['chunk_id']}").json()
    assert passage == hits[0]["passage"]

    assert admin.send("DELETE", doc_path).status_code == 204
    assert admin.get(doc_path).status_code == 404
    assert admin.send("POST", f"/api/kbs/{kb}/search", query).json()["hits"] == []


def test_private_shared_read_and_shared_write(admin: Browser, browsers: NewBrowser) -> None:
    bob, carol = user(browsers, "bob"), user(browsers, "carol")
    kb = kb_with_documents(bob)
    ask = {"question": QUESTION, "stream": False}
    search = {"query": "E-4471"}
    for method, path, body in [
        ("GET", f"/api/kbs/{kb}", None),
        ("GET", f"/api/kbs/{kb}/documents", None),
        ("POST", f"/api/kbs/{kb}/search", search),
        ("POST", f"/api/kbs/{kb}/ask", ask),
        ("PATCH", f"/api/kbs/{kb}", {"name": "mine"}),
        ("DELETE", f"/api/kbs/{kb}", None),
        ("POST", "/api/kbs/999999/search", search),  # one that doesn't exist looks the same
    ]:
        resp = carol.send(method, path, body)
        assert resp.status_code == 404, (method, path)
        assert resp.json()["error"]["code"] == "not_found"
    assert upload(carol, f"/api/kbs/{kb}/documents", [("x.txt", b"x")]).status_code == 404
    assert carol.get("/api/kbs").json() == []
    assert [k["id"] for k in admin.get("/api/kbs").json()] == [kb]  # an admin sees all

    bob.send("PATCH", f"/api/kbs/{kb}", {"visibility": "shared_read"})
    listed = carol.get("/api/kbs").json()
    assert [(k["id"], k["can_write"], k["can_manage"]) for k in listed] == [(kb, False, False)]
    assert carol.send("POST", f"/api/kbs/{kb}/search", search).json()["hits"]
    answer = carol.send("POST", f"/api/kbs/{kb}/ask", ask).json()
    check_cited_answer({"type": "done", **answer}, answer["answer"])
    refused = upload(carol, f"/api/kbs/{kb}/documents", [("x.txt", b"carol's notes")])
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "read_only"
    doc = bob.get(f"/api/kbs/{kb}/documents").json()[0]["id"]
    assert carol.send("DELETE", f"/api/kbs/{kb}/documents/{doc}").status_code == 403
    assert carol.send("PATCH", f"/api/kbs/{kb}", {"name": "x"}).status_code == 403
    assert carol.send("DELETE", f"/api/kbs/{kb}").status_code == 403

    bob.send("PATCH", f"/api/kbs/{kb}", {"visibility": "shared_write"})
    added = upload(carol, f"/api/kbs/{kb}/documents", [("x.txt", b"carol's notes")])
    assert added.status_code == 201
    assert carol.send("DELETE", f"/api/kbs/{kb}").status_code == 403  # still only the owner's
    assert bob.send("DELETE", f"/api/kbs/{kb}").status_code == 204
    assert bob.get(f"/api/kbs/{kb}").status_code == 404


def test_file_names_are_labels_and_uploads_are_bounded(
    make_app: AppFactory, tmp_path: Path
) -> None:
    b = Browser(make_app(max_upload_bytes=50_000, max_requests_per_minute=1_000_000))
    try:
        assert b.signup("alice").status_code == 201
        kb = new_kb(b)
        path = f"/api/kbs/{kb}/documents"
        secret = b"root:x:0:0:root:/root:/bin/bash"
        uploaded = upload(b, path, [("../../etc/passwd", secret)]).json()["uploaded"][0]
        assert uploaded["file_name"] == "../../etc/passwd"  # what was sent, reported back
        assert uploaded["document"]["file_name"] == "passwd"  # what is kept: a label
        assert not (tmp_path / "etc").exists() and not (tmp_path / "data0" / "etc").exists()
        download = b.get(f"{path}/{uploaded['document']['id']}/file")
        assert download.content == secret
        assert download.headers["content-type"] == "application/octet-stream"
        assert download.headers["content-disposition"] == "attachment; filename*=UTF-8''passwd"

        too_big = upload(b, path, [("big.txt", b"x" * 60_000)])
        assert too_big.status_code == 413
        assert too_big.json()["error"]["code"] == "upload_too_large"
        assert "50000 bytes" in too_big.json()["error"]["message"]
        # no Content-Length: refused while streaming, once the bytes read pass the limit
        body = iter(
            [b"--b\r\nContent-Disposition: form-data; name=files; filename=a.txt\r\n\r\n"]
            + [b"y" * 10_000] * 8
            + [b"\r\n--b--\r\n"]
        )
        headers = {"Content-Type": "multipart/form-data; boundary=b", **b.headers()}
        chunked = b.client.post(path, content=body, headers=headers)
        assert chunked.status_code == 413
        assert chunked.json()["error"]["code"] == "upload_too_large"
        assert [d["file_name"] for d in b.get(path).json()] == ["passwd"]
    finally:
        b.close()


def test_bodies_are_bounded_and_uploads_wait_for_a_session(make_app: AppFactory) -> None:
    """JSON routes take max_json_bytes (anyone, logged in or not); an upload's body is not
    read for a client that is not logged in (401 while it is still sending)."""
    url = make_app(max_upload_bytes=1_000_000, max_json_bytes=10_000)
    b = Browser(url)
    try:
        big = {"username": "x" * 20_000, "password": "password123"}
        refused = b.client.post("/api/signup", json=big)
        assert refused.status_code == 413, refused.text
        assert refused.json()["error"]["code"] == "body_too_large"
        # the same without a Content-Length: counted as it streams in
        chunks = iter([b'{"username": "', b"x" * 8_000, b"x" * 8_000, b'"}'])
        headers = {"Content-Type": "application/json"}
        streamed = b.client.post("/api/signup", content=chunks, headers=headers)
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "body_too_large"
        assert b.signup("alice").status_code == 201
        kb = new_kb(b)

        def body() -> Iterator[bytes]:
            yield b"--b\r\nContent-Disposition: form-data; name=files; filename=a.txt\r\n\r\n"
            for _ in range(90):
                yield b"y" * 10_000
            yield b"\r\n--b--\r\n"

        anonymous = httpx.Client(base_url=url, timeout=30.0)
        multipart = {"Content-Type": "multipart/form-data; boundary=b"}
        resp = anonymous.post(f"/api/kbs/{kb}/documents", content=body(), headers=multipart)
        anonymous.close()
        assert resp.status_code == 401
        # an upload may be larger than a JSON body, up to max_upload_bytes
        accepted = b.client.post(
            f"/api/kbs/{kb}/documents", content=body(), headers=multipart | b.headers()
        )
        assert accepted.status_code == 201, accepted.text
        assert accepted.json()["uploaded"][0]["document"]["size_bytes"] == 900_000
    finally:
        b.close()


def test_ingestion_does_not_block_chat(admin: Browser, held: FakeUpstream) -> None:
    kb = new_kb(admin)
    big = f"{HOLD_MARKER}\n\n".encode() + b"The dome log records wind and cloud. " * 8000
    path = f"/api/kbs/{kb}/documents"
    document = upload(admin, path, [("log.txt", big)]).json()["uploaded"][0]["document"]
    wait_for(held.embed_held.is_set, "the big file's embedding request")

    cid = admin.new_conversation()
    evs = admin.stream("POST", f"/api/conversations/{cid}/messages", {"content": "hello"})
    assert evs[-1]["type"] == "done"
    # the chat finished while ingestion was still under way
    assert admin.get(f"{path}/{document['id']}").json()["status"] == "processing"
    other = kb_with_documents(admin)  # a second knowledge base ingests meanwhile, too
    assert admin.send("POST", f"/api/kbs/{other}/search", {"query": "E-4471"}).json()["hits"]

    held.embed_release.set()
    [log] = settled(admin, path)
    assert log["status"] == "done" and log["num_chunks"] > 100


def test_conversation_with_a_knowledge_base_saves_citations(
    admin: Browser, browsers: NewBrowser
) -> None:
    kb = kb_with_documents(admin)
    cid = admin.new_conversation(system_prompt="Answer briefly.")
    attached = admin.send("PUT", f"/api/conversations/{cid}/kbs", {"kb_ids": [kb]})
    assert attached.status_code == 200 and attached.json()["kb_ids"] == [kb]

    evs = admin.stream("POST", f"/api/conversations/{cid}/messages", {"content": QUESTION})
    done = evs[-1]
    check_cited_answer(done, answer_text(evs))
    knowledge = admin.get(f"/api/conversations/{cid}/knowledge").json()
    saved = knowledge["sources"][str(done["message_id"])]
    assert saved == {k: done[k] for k in ("found", "passages", "segments", "cited")}
    messages = admin.get(f"/api/conversations/{cid}").json()["messages"]
    assert messages[-1]["id"] == done["message_id"] and messages[-1]["content"] == answer_text(evs)

    evs = admin.stream("POST", f"/api/conversations/{cid}/regenerate")  # a new answer, cited
    assert evs[-1]["message_id"] != done["message_id"] and evs[-1]["cited"] == [1]
    sources = admin.get(f"/api/conversations/{cid}/knowledge").json()["sources"]
    assert list(sources) == [str(evs[-1]["message_id"])]  # the dropped answer's went with it

    bob = user(browsers, "bob")
    private = new_kb(bob)
    allowed = admin.send("PUT", f"/api/conversations/{cid}/kbs", {"kb_ids": [private]})
    assert allowed.status_code == 200  # an admin may read every knowledge base
    bobs = bob.new_conversation()
    assert bob.send("PUT", f"/api/conversations/{bobs}/kbs", {"kb_ids": [kb]}).status_code == 404
    assert bob.get(f"/api/conversations/{cid}/knowledge").status_code == 404
    detached = admin.send("PUT", f"/api/conversations/{cid}/kbs", {"kb_ids": []})
    assert detached.json()["kb_ids"] == []
    evs = admin.stream("POST", f"/api/conversations/{cid}/messages", {"content": "hi"})
    assert "passages" not in evs[-1]  # a plain chat answer again


def test_stop_and_service_errors(admin: Browser, fake: FakeUpstream) -> None:
    kb = kb_with_documents(admin)
    cid = admin.new_conversation()
    admin.send("PUT", f"/api/conversations/{cid}/kbs", {"kb_ids": [kb]})
    fake.stall_closed.clear()
    body = {"content": "#stalled: what does fault E-4471 mean?"}  # (words the passage has)
    path = f"/api/conversations/{cid}/messages"
    with admin.client.stream("POST", path, json=body, headers=admin.headers()) as r:
        for event in events(r):
            if event["type"] == "delta":
                break  # Stop
    assert fake.stall_closed.wait(20), "the app kept the service's request open"

    def saved() -> list[dict[str, object]]:
        return admin.get(f"/api/conversations/{cid}").json()["messages"]

    wait_for(lambda: len(saved()) == 2, "the stopped answer to be saved")
    assert saved()[1]["status"] == "stopped" and saved()[1]["content"] == "partial "
    sources = admin.get(f"/api/conversations/{cid}/knowledge").json()["sources"]
    assert sources[str(saved()[1]["id"])]["passages"][0]["file_name"] == "manual.md"

    evs = admin.stream("POST", f"/api/kbs/{kb}/ask", {"question": "#503 fault E-4471 stalled"})
    assert evs[-1]["type"] == "error" and evs[-1]["status"] == 503 and evs[-1]["retryable"]
    plain = admin.send(
        "POST", f"/api/kbs/{kb}/ask", {"question": "#429 fault E-4471 stalled", "stream": False}
    )
    assert plain.status_code == 429 and plain.json()["error"]["code"] == "upstream"


def test_file_chat(admin: Browser, tmp_path: Path) -> None:
    cid = admin.new_conversation()
    resp = upload(admin, f"/api/conversations/{cid}/files", [("manual.md", MANUAL)])
    assert resp.status_code == 201, resp.text
    [file] = settled(admin, f"/api/conversations/{cid}/knowledge")
    assert file["status"] == "done" and file["file_name"] == "manual.md"
    assert admin.get("/api/kbs").json() == []  # the conversation's files are no knowledge base

    evs = admin.stream("POST", f"/api/conversations/{cid}/messages", {"content": QUESTION})
    check_cited_answer(evs[-1], answer_text(evs))
    files_kb = file["kb_id"]
    assert admin.get(f"/api/kbs/{files_kb}").status_code == 200
    blobs = tmp_path / "data0" / "kb-files"
    assert sum(1 for p in blobs.rglob("*") if p.is_file()) == 1

    assert admin.send("DELETE", f"/api/conversations/{cid}").status_code == 204
    assert admin.get(f"/api/kbs/{files_kb}").status_code == 404  # deleted with it
    assert sum(1 for p in blobs.rglob("*") if p.is_file()) == 0

    other = admin.new_conversation()
    assert admin.get(f"/api/conversations/{other}/files/progress").status_code == 404
    upload(admin, f"/api/conversations/{other}/files", [("tea.txt", TEA)])
    progress = admin.stream("GET", f"/api/conversations/{other}/files/progress")
    [tea] = progress[-2]["documents"]
    assert tea["status"] == "done"
    assert admin.send("DELETE", f"/api/conversations/{other}/files/{tea['id']}").status_code == 204
    assert admin.get(f"/api/conversations/{other}/knowledge").json()["files"] == []


def test_keyword_only_knowledge_base_and_settings(admin: Browser) -> None:
    assert admin.get("/api/embedding-models").json() == {"models": ["embed-x"]}
    kb = admin.send("POST", "/api/kbs", {"name": "k", "embedding_model": "", "chunk_size": 200})
    assert kb.json()["embedding_model"] == "" and kb.json()["chunk_size"] == 200
    kb_id = kb.json()["id"]
    upload(admin, f"/api/kbs/{kb_id}/documents", [("manual.md", MANUAL)])
    settled(admin, f"/api/kbs/{kb_id}/documents")
    for mode in ("hybrid", "bm25"):
        body = {"query": "E-4471", "mode": mode}
        hits = admin.send("POST", f"/api/kbs/{kb_id}/search", body).json()["hits"]
        assert "E-4471" in hits[0]["passage"]["text"] and hits[0]["vector"] == 0
    vector = admin.send("POST", f"/api/kbs/{kb_id}/search", {"query": "x", "mode": "vector"})
    assert vector.status_code == 400
    answer = admin.send("POST", f"/api/kbs/{kb_id}/ask", {"question": QUESTION, "stream": False})
    assert answer.json()["cited"] == [1]

    bad_overlap = admin.send("POST", "/api/kbs", {"name": "k", "chunk_size": 100, "overlap": 60})
    assert bad_overlap.status_code == 422
    unknown = admin.send("POST", "/api/kbs", {"name": "k", "embedding_model": "chat-a"})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_model"


def test_routes_are_documented(admin: Browser) -> None:
    paths = admin.get("/api/openapi.json").json()["paths"]
    operations = {op["operationId"] for item in paths.values() for op in item.values()}
    for name in ("create_kb", "upload_documents", "search_kb", "ask_kb", "attach_files"):
        assert name in operations
    upload_body = paths["/api/kbs/{kb_id}/documents"]["post"]["requestBody"]
    assert "multipart/form-data" in upload_body["content"]
    doc = (Path(__file__).parents[2] / "docs" / "app-api.md").read_text()
    for path, item in paths.items():
        if "/kbs" in path or "knowledge" in path or "/files" in path or "embedding" in path:
            for method in item:
                assert f"{method.upper()} {path}" in doc, f"{method.upper()} {path}"


def test_asks_are_rate_limited(make_app: AppFactory) -> None:
    b = Browser(make_app(max_requests_per_minute=4))
    try:
        assert b.signup("alice").status_code == 201
        kb = new_kb(b)  # 1
        codes = [
            b.send("POST", f"/api/kbs/{kb}/ask", {"question": "hi", "stream": False}).status_code
            for _ in range(4)
        ]
        assert codes == [200, 200, 200, 429]
    finally:
        b.close()


def test_the_services_rerank_model_orders_the_hits(admin: Browser, fake: FakeUpstream) -> None:
    """The fake service serves a rerank model (rerank-y): hybrid retrieval hands it a pool of
    candidates and its order wins (it puts the RERANKTOP passage first)."""
    kb = new_kb(admin)
    note = b"Tea notes. RERANKTOP green tea should steep two minutes at 80 degrees."
    resp = upload(admin, f"/api/kbs/{kb}/documents", [("manual.md", MANUAL), ("note.txt", note)])
    assert resp.status_code == 201, resp.text
    settled(admin, f"/api/kbs/{kb}/documents")
    before = len(fake.rerank_requests)
    hits = admin.send("POST", f"/api/kbs/{kb}/search", {"query": "fault E-4471 dome", "top_k": 2})
    assert hits.status_code == 200, hits.text
    body = hits.json()["hits"]
    assert "RERANKTOP" in body[0]["passage"]["text"] and body[0]["rerank"] == pytest.approx(
        1000.0, abs=10
    )
    assert all(h["rerank"] is not None for h in body)
    asked = fake.rerank_requests[before:]
    assert len(asked) == 1 and asked[0]["model"] == "rerank-y"
    assert asked[0]["query"] == "fault E-4471 dome" and len(asked[0]["documents"]) >= 2
