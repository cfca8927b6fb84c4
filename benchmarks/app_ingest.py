"""The web app's knowledge-base ingestion through `surge serve`, and chat beside it.

Starts `surge serve` (by default the bundled SmolLM2-135M-Instruct and all-MiniLM-L6-v2) with the
app at /, and drives it only through the app's REST API, as users do:
1. chat alone: `--users` users each send `--turns` messages, one at a time, all users at once;
   TTFT (the POST to the first `delta` event) p50/p95. Each answer is read for
   `--answer-deltas` deltas, then the stream is closed (which aborts it in the engine), so every
   turn costs about the same whatever the model would have said.
2. one large PDF (`--pdf-mb` of generated English text, a real PDF: one Helvetica text line per
   line, ~60 lines a page; no PDF library writes text and none is a dependency) uploaded into a
   knowledge base: MB/min and chunks/s from the upload to the last document `done`.
3. `--num-small` small Markdown files (`--small-kb` each, English and Chinese) in one upload:
   the same rates.
4. the large PDF again, into a new knowledge base, while the users chat as in 1: TTFT during
   the ingestion, and the ingestion's rates under that load.
`--chat-during-only` replaces 2-4 by: chat as in 1 for `--window` seconds, then the same while
the large PDF uploads, parses and starts embedding (its full ingestion takes far longer).
Seeded; the text and prompts are the same each run. Prints one JSON object.

    python benchmarks/app_ingest.py                      # full size (tens of MB): minutes
    python benchmarks/app_ingest.py --pdf-mb 0.2 --num-small 5 --users 2 --turns 2   # smoke
    python benchmarks/app_ingest.py --chat-during-only --window 60   # TTFT beside ingestion
    python benchmarks/app_ingest.py --serve-arg=--threads --serve-arg=8   # more server flags
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from kb_ingest import EN_WORDS, ZH_WORDS  # the same vocabulary (benchmarks/ is on sys.path)

from surge.bench.machine import machine_info

PASSWORD = "password123"
TOPICS = ["telescopes", "bread", "bicycles", "databases", "tea", "travel", "recycling", "music"]


# ---- generated documents ------------------------------------------------------------------


def sentences(rng: random.Random, words: list[str], sep: str, end: str, n: int) -> list[str]:
    return [sep.join(rng.choice(words) for _ in range(rng.randint(6, 18))) + end for _ in range(n)]


def make_pdf(num_bytes: int, rng: random.Random) -> bytes:
    """A PDF of about `num_bytes`: pages of 60 lines of English, each line a Tj operator."""
    pages: list[list[str]] = []
    size = 0
    while size < num_bytes:
        lines = sentences(rng, EN_WORDS, " ", ".", 60)
        pages.append(lines)
        size += sum(len(line) + 8 for line in lines) + 300
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"",  # the page tree, once the pages are numbered
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    kids = []
    for lines in pages:
        ops = " ".join(f"({line}) Tj T*" for line in lines)
        stream = f"BT /F1 9 Tf 11 TL 36 760 Td {ops} ET".encode()
        kids.append(f"{len(objects) + 1} 0 R")
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects) + 2} "
            "0 R /Resources << /Font << /F1 3 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>".encode()
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.writelines(b"%010d 00000 n \n" % offset for offset in offsets)
    out.write(
        b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    )
    return out.getvalue()


def make_markdown(num_bytes: int, rng: random.Random, chinese: bool) -> bytes:
    parts, size = [], 0
    while size < num_bytes:
        heading = f"## {rng.choice(ZH_WORDS if chinese else EN_WORDS)} {len(parts)}"
        if chinese:
            body = "".join(sentences(rng, ZH_WORDS, "", "。", rng.randint(2, 6)))
        else:
            body = " ".join(sentences(rng, EN_WORDS, " ", ".", rng.randint(2, 6)))
        parts.append(f"{heading}\n\n{body}\n")
        size += len(parts[-1].encode())
    return "\n".join(parts).encode()


# ---- the server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    data_dir: Path, extra: list[str], log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "surge.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir), *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"surge serve exited; see {log}")
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"surge serve not ready; see {log}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's own PID, then a kill if it hasn't exited within a minute."""
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


# ---- users --------------------------------------------------------------------------------


class User:
    """One user of the app: a cookie jar and a CSRF token."""

    def __init__(self, base: str) -> None:
        self.client = httpx.AsyncClient(base_url=base, timeout=600)
        self.csrf = ""

    async def signup(self, name: str) -> None:
        r = await self.client.post("/api/signup", json={"username": name, "password": PASSWORD})
        r.raise_for_status()
        self.csrf = r.json()["csrf_token"]

    async def send(self, method: str, path: str, body: object = None) -> httpx.Response:
        r = await self.client.request(method, path, json=body, headers={"X-CSRF-Token": self.csrf})
        r.raise_for_status()
        return r


async def ask(user: User, method: str, path: str, text: str, max_deltas: int) -> tuple[float, int]:
    """TTFT of one answer (s) and the user message's id; the stream is closed after
    `max_deltas` deltas."""
    start = time.perf_counter()
    ttft, message_id, deltas = float("nan"), 0, 0
    headers = {"X-CSRF-Token": user.csrf}
    async with user.client.stream(method, path, json={"content": text}, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "start":
                message_id = event["user_message_id"]
            elif event["type"] == "delta":
                if deltas == 0:
                    ttft = time.perf_counter() - start
                deltas += 1
                if deltas >= max_deltas:
                    break
            elif event["type"] in ("done", "error"):
                break
    return ttft, message_id


async def chat_loop(
    user: User, index: int, turns: int, max_deltas: int, until: asyncio.Event | None
) -> list[float]:
    """`turns` answers (or, with `until`, answers until it is set, at least one): each turn
    edits the conversation's one message and resends it, so prompts stay the same length."""
    conv = (await user.send("POST", "/api/conversations", {"temperature": 0})).json()["id"]
    ttfts: list[float] = []
    message_id = 0
    turn = 0
    while (until is None and turn < turns) or (
        until is not None and not (ttfts and until.is_set())
    ):
        text = f"In two sentences, what should a beginner know about {TOPICS[(index + turn) % 8]}?"
        if message_id == 0:
            path, method = f"/api/conversations/{conv}/messages", "POST"
        else:
            path, method = f"/api/conversations/{conv}/messages/{message_id}", "PUT"
        ttft, sent_id = await ask(user, method, path, text, max_deltas)
        message_id = message_id or sent_id
        ttfts.append(ttft)
        turn += 1
    return ttfts


def percentiles(values: list[float]) -> dict[str, float | int]:
    clean = [v for v in values if v == v]
    if not clean:
        return {"num": 0}
    p50, p95, p99 = np.percentile(clean, [50, 95, 99])
    return {
        "num": len(clean),
        "p50_ms": round(p50 * 1000, 1),
        "p95_ms": round(p95 * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
    }


async def ingest(admin: User, name: str, files: list[tuple[str, bytes]]) -> dict[str, float | int]:
    """Upload `files` into a new knowledge base; rates from the upload to the last `done`."""
    kb = (await admin.send("POST", "/api/kbs", {"name": name})).json()["id"]
    parts = [("files", (n, data, "application/octet-stream")) for n, data in files]
    start = time.perf_counter()
    r = await admin.client.post(
        f"/api/kbs/{kb}/documents", files=parts, headers={"X-CSRF-Token": admin.csrf}
    )
    r.raise_for_status()
    documents: list[dict[str, object]] = []
    async with admin.client.stream("GET", f"/api/kbs/{kb}/documents/progress") as progress:
        async for line in progress.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "documents":
                    documents = event["documents"]
                elif event["type"] == "settled":
                    break
    seconds = time.perf_counter() - start
    num_bytes = sum(len(data) for _, data in files)
    num_chunks = sum(int(d["num_chunks"]) for d in documents)  # type: ignore[call-overload]
    statuses = sorted({str(d["status"]) for d in documents})
    return {
        "num_files": len(files),
        "mb": round(num_bytes / 1e6, 2),
        "seconds": round(seconds, 2),
        "mb_per_min": round(num_bytes / 1e6 / seconds * 60, 2),
        "num_chunks": num_chunks,
        "chunks_per_s": round(num_chunks / seconds, 1),
        "statuses": statuses,  # ["done"] when every file made it
    }


def _ttft_ratio(result: dict[str, object]) -> None:
    alone, during = result["chat_alone"], result["chat_during_ingest"]
    if isinstance(alone, dict) and isinstance(during, dict) and alone.get("p95_ms"):
        result["ttft_p95_ratio"] = round(float(during["p95_ms"]) / float(alone["p95_ms"]), 2)


async def run(args: argparse.Namespace, base: str) -> dict[str, object]:
    rng = random.Random(args.seed)
    pdf = make_pdf(int(args.pdf_mb * 1e6), rng)
    small = [
        (f"note-{i}.md", make_markdown(int(args.small_kb * 1000), rng, chinese=i % 2 == 1))
        for i in range(args.num_small)
    ]
    admin = User(base)
    await admin.signup("admin")  # the first user: the admin
    users = [User(base) for _ in range(args.users)]
    for i, user in enumerate(users):
        await user.signup(f"user{i}")

    async def chat(until: asyncio.Event | None) -> list[float]:
        per_user = await asyncio.gather(
            *(chat_loop(u, i, args.turns, args.answer_deltas, until) for i, u in enumerate(users))
        )
        return [t for ttfts in per_user for t in ttfts]

    async def chat_for(seconds: float) -> list[float]:
        until = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, until.set)
        return await chat(until)

    result: dict[str, object] = {"pdf_bytes": len(pdf), "users": args.users}
    if args.pdf_only:  # the large PDF alone (full size with chat beside it takes hours here)
        result["ingest_pdf"] = await ingest(admin, "pdf", [("big.pdf", pdf)])
        for user in [admin, *users]:
            await user.client.aclose()
        return result
    if args.chat_during_only:  # chat for --window s alone, then --window s while it ingests
        result["chat_alone"] = percentiles(await chat_for(args.window))
        ingesting = asyncio.create_task(ingest(admin, "pdf-during", [("big.pdf", pdf)]))
        result["chat_during_ingest"] = percentiles(await chat_for(args.window))
        result["ingestion_still_running_after_chat"] = not ingesting.done()
        ingesting.cancel()
        await asyncio.gather(ingesting, return_exceptions=True)
        _ttft_ratio(result)
        for user in [admin, *users]:
            await user.client.aclose()
        return result
    result["chat_alone"] = percentiles(await chat(None))
    result["ingest_pdf"] = await ingest(admin, "pdf", [("big.pdf", pdf)])
    result["ingest_small"] = await ingest(admin, "small", small)
    finished = asyncio.Event()
    chatting = asyncio.create_task(chat(finished))
    result["ingest_pdf_with_chat"] = await ingest(admin, "pdf-again", [("big.pdf", pdf)])
    finished.set()
    result["chat_during_ingest"] = percentiles(await chatting)
    _ttft_ratio(result)
    for user in [admin, *users]:
        await user.client.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdf-mb", type=float, default=30.0, help="size of the large PDF")
    parser.add_argument("--num-small", type=int, default=100, help="small files (at most 100)")
    parser.add_argument("--small-kb", type=float, default=20.0, help="size of each small file")
    parser.add_argument("--users", type=int, default=8, help="concurrent chatting users")
    parser.add_argument("--turns", type=int, default=4, help="answers per user, chat alone")
    parser.add_argument("--answer-deltas", type=int, default=64, help="deltas read per answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pdf-only", action="store_true", help="only step 2: the large PDF, nothing beside it"
    )
    parser.add_argument(
        "--chat-during-only",
        action="store_true",
        help="chat --window s alone, then --window s while the large PDF ingests (not to its end)",
    )
    parser.add_argument(
        "--window", type=float, default=60.0, help="seconds of each chat phase, --chat-during-only"
    )
    parser.add_argument(
        "--serve-arg", action="append", default=[], help="a flag for surge serve (repeatable)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="app-ingest-") as tmp:
        log = Path(tmp) / "serve.log"
        proc, base = start_server(Path(tmp) / "app", args.serve_arg, log)
        try:
            result = asyncio.run(run(args, base))
            result["serve_args"] = args.serve_arg
            result["machine"] = machine_info()
            print(json.dumps(result, indent=2))
        finally:
            stop_server(proc)


if __name__ == "__main__":
    main()
