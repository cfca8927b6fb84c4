"""Knowledge-base chat end to end through `surge serve`: latency at 1 and at 8 concurrent users.

Starts `surge serve` (by default the bundled SmolLM2-135M-Instruct and all-MiniLM-L6-v2) with the
app at /, and drives it only through the app's REST API (the helpers of app_ingest.py):
- set-up, not timed: the admin makes one knowledge base of the golden set's 8 documents
  (tests/app_kb/golden/docs, English and Chinese) and `--filler-mb` of generated Markdown (the
  seeded en/zh text of app_ingest.py: distractors, so retrieval searches a KB of some size),
  waits until every document is `done` and shares it read-only (`shared_read`): all users ask
  the same knowledge base, one index. Then one warm-up answer.
- measured, for each level of `--users` (default 1,8): that many users at once, each in a new
  conversation (temperature 0) with the knowledge base attached, ask `--turns` questions one at
  a time: the golden set's follow-up conversations (tests/app_kb/golden/followups.json, 27,
  en and zh) in a seeded order, user i starting i*turns questions in, so users ask different
  questions and later turns carry history and follow-ups. Per answer, from its POST:
    start        POST -> the `retrieving` status (log-in check, storing the message, history)
    retrieval    `retrieving` -> `waiting`: the search query, its embedding (/v1/embeddings),
                 hybrid search, the prompt
    model_ttft   `waiting` -> first delta: queue and prefill in the model service
    first_delta  POST -> first delta: what the user waits for (status `generating` comes with it)
    answer       POST -> the end of the answer
  The app takes no max-tokens (neither a conversation nor /ask has one), so an answer is read for
  `--answer-deltas` deltas and the stream is then closed (which stops it in the engine), as
  app_ingest.py does; one that ends sooner ends at its `done`. The next turn waits (untimed)
  until the app has saved the stopped answer, so the history is the same every run.
  When retrieval finds nothing relevant the model isn't asked (`not_found` counts those): such
  answers count in start/retrieval/first_delta/answer but not in model_ttft.
Seeded. Prints one JSON object (stdout), then a short summary (stderr).

    python benchmarks/kb_chat.py                       # 1 then 8 users, 4 turns each
    python benchmarks/kb_chat.py --smoke               # 1 then 2 users, 2 turns, tiny KB
    python benchmarks/kb_chat.py --serve-arg=--threads --serve-arg=2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from app_ingest import User, ingest, make_markdown, percentiles, start_server, stop_server

from surge.bench.machine import describe_cpu, machine_info

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "app_kb" / "golden"
NAN = float("nan")


@dataclass(slots=True)
class Answer:
    """When one answer's events arrived, in seconds from its POST (nan: never)."""

    retrieving: float = NAN
    waiting: float = NAN  # absent when nothing relevant was found (the model isn't asked)
    first_delta: float = NAN
    end: float = NAN
    num_deltas: int = 0
    error: str | None = None

    @property
    def asked(self) -> bool:
        """Whether the model was asked (its `waiting` status came)."""
        return self.waiting == self.waiting  # nan != nan


def questions(seed: int) -> list[str]:
    """Every turn of the golden follow-up conversations, conversations in a seeded order."""
    conversations = json.loads((GOLDEN / "followups.json").read_text(encoding="utf-8"))
    random.Random(seed).shuffle(conversations)
    return [turn for conversation in conversations for turn in conversation["turns"]]


async def make_kb(admin: User, filler_mb: float, seed: int) -> tuple[int, dict[str, object]]:
    """The shared knowledge base: golden documents and filler, ingested; its id and summary."""
    files = [(path.name, path.read_bytes()) for path in sorted((GOLDEN / "docs").iterdir())]
    rng = random.Random(seed)
    num_filler = max(1, round(filler_mb * 1e6 / 50_000)) if filler_mb > 0 else 0
    for i in range(num_filler):  # files of ~50 kB, alternately English and Chinese
        size = int(filler_mb * 1e6 / num_filler)
        files.append((f"filler-{i}.md", make_markdown(size, rng, chinese=i % 2 == 1)))
    stats = await ingest(admin, "kb-chat", files)
    if stats["statuses"] != ["done"]:
        raise RuntimeError(f"ingestion ended {stats['statuses']}, not all done")
    kb = next(
        k["id"] for k in (await admin.send("GET", "/api/kbs")).json() if k["name"] == "kb-chat"
    )
    await admin.send("PATCH", f"/api/kbs/{kb}", {"visibility": "shared_read"})
    keep = ("num_files", "mb", "num_chunks", "seconds")
    return kb, {k: stats[k] for k in keep} | {"sharing": "one KB, shared_read, admin's"}


async def ask(user: User, conversation: int, text: str, max_deltas: int) -> Answer:
    """One turn of a KB conversation, timed by its events; closed after `max_deltas` deltas."""
    answer = Answer()
    path = f"/api/conversations/{conversation}/messages"
    headers = {"X-CSRF-Token": user.csrf}
    start = time.perf_counter()
    async with user.client.stream("POST", path, json={"content": text}, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            now = time.perf_counter() - start
            if event["type"] == "status" and event["state"] == "retrieving":
                answer.retrieving = now
            elif event["type"] == "status" and event["state"] == "waiting":
                answer.waiting = now
            elif event["type"] == "delta":
                answer.first_delta = now if answer.num_deltas == 0 else answer.first_delta
                answer.num_deltas += 1
                if answer.num_deltas >= max_deltas:
                    answer.end = now
                    break
            elif event["type"] in ("done", "error"):
                answer.end = now
                answer.error = str(event.get("message")) if event["type"] == "error" else None
                break
    return answer


async def wait_saved(user: User, conversation: int, num_messages: int) -> None:
    """Until the conversation holds `num_messages` (a stopped answer is saved as the stream
    closes, a moment after the client let go)."""
    for _ in range(100):
        if (
            len((await user.send("GET", f"/api/conversations/{conversation}")).json()["messages"])
            >= num_messages
        ):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"conversation {conversation}: the answer was never saved")


async def converse(user: User, kb: int, texts: list[str], max_deltas: int) -> list[Answer]:
    """One user's KB conversation: `texts` asked one at a time."""
    conversation = (await user.send("POST", "/api/conversations", {"temperature": 0})).json()["id"]
    await user.send("PUT", f"/api/conversations/{conversation}/kbs", {"kb_ids": [kb]})
    answers = []
    for turn, text in enumerate(texts):
        answers.append(await ask(user, conversation, text, max_deltas))
        await wait_saved(user, conversation, 2 * (turn + 1))
    return answers


def phases(answers: list[Answer]) -> dict[str, object]:
    """p50/p95 of each phase over the answers (see the module doc)."""
    ok = [a for a in answers if a.error is None]
    asked = [a for a in ok if a.asked]
    return {
        "start": percentiles([a.retrieving for a in ok]),
        "retrieval": percentiles(  # a "not found" answer's one delta ends its retrieval
            [(a.waiting if a.asked else a.first_delta) - a.retrieving for a in ok]
        ),
        "model_ttft": percentiles([a.first_delta - a.waiting for a in asked]),
        "first_delta": percentiles([a.first_delta for a in ok]),
        "answer": percentiles([a.end for a in ok]),
        "num_answers": len(answers),
        "num_errors": len(answers) - len(ok),
        "errors": sorted({str(a.error) for a in answers if a.error is not None})[:3],
        "not_found": len(ok) - len(asked),
        "mean_deltas": round(sum(a.num_deltas for a in asked) / max(1, len(asked)), 1),
    }


async def level(users: list[User], kb: int, args: argparse.Namespace) -> dict[str, object]:
    """All `users` converse at once; the phases and the answers per minute."""
    texts = questions(args.seed)
    per_user = [
        [texts[(i * args.turns + j) % len(texts)] for j in range(args.turns)]
        for i in range(len(users))
    ]
    start = time.perf_counter()
    results = await asyncio.gather(
        *(converse(u, kb, t, args.answer_deltas) for u, t in zip(users, per_user, strict=True))
    )
    seconds = time.perf_counter() - start
    answers = [a for result in results for a in result]
    return {
        "users": len(users),
        "turns": args.turns,
        "seconds": round(seconds, 2),
        "requests_per_min": round(len(answers) / seconds * 60, 1),
        **phases(answers),
    }


async def run(args: argparse.Namespace, base: str) -> dict[str, object]:
    admin = User(base)
    await admin.signup("admin")  # the first user: the admin, owner of the knowledge base
    users = [User(base) for _ in range(max(args.users))]
    for i, user in enumerate(users):
        await user.signup(f"user{i}")
    kb, kb_info = await make_kb(admin, args.filler_mb, args.seed)
    await converse(admin, kb, questions(args.seed)[-1:], args.answer_deltas)  # warm-up
    result: dict[str, object] = {"kb": kb_info, "answer_deltas": args.answer_deltas}
    result["levels"] = [await level(users[:n], kb, args) for n in args.users]
    for user in [admin, *users]:
        await user.client.aclose()
    return result


def summary(result: dict[str, object]) -> str:
    lines = [f"Machine: {describe_cpu(result['machine'])}"]  # type: ignore[arg-type]
    lines.append(f"KB: {result['kb']}; answers capped at {result['answer_deltas']} deltas")
    lines.append("users  req/min  p50/p95 ms: retrieval  model_ttft  first_delta  answer")
    for row in result["levels"]:  # type: ignore[attr-defined]
        cells = [
            f"{row[p].get('p50_ms', 'nan')}/{row[p].get('p95_ms', 'nan')}"
            for p in ("retrieval", "model_ttft", "first_delta", "answer")
        ]
        extra = f"  ({row['num_errors']} errors, {row['not_found']} not found)"
        lines.append(
            f"{row['users']:>5}  {row['requests_per_min']:>7}  " + "  ".join(cells) + extra
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="1,8", help="concurrency levels, comma-separated")
    parser.add_argument("--turns", type=int, default=4, help="questions per user and level")
    parser.add_argument("--answer-deltas", type=int, default=64, help="deltas read per answer")
    parser.add_argument("--filler-mb", type=float, default=1.0, help="generated text in the KB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="1 then 2 users, 2 turns, tiny KB")
    parser.add_argument(
        "--serve-arg", action="append", default=[], help="a flag for surge serve (repeatable)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.users, args.turns, args.answer_deltas, args.filler_mb = "1,2", 2, 16, 0.05
    args.users = [int(n) for n in args.users.split(",")]
    with tempfile.TemporaryDirectory(prefix="kb-chat-") as tmp:
        log = Path(tmp) / "serve.log"
        proc, base = start_server(Path(tmp) / "app", args.serve_arg, log)
        try:
            result = asyncio.run(run(args, base))
            result["serve_args"] = args.serve_arg
            result["machine"] = machine_info()
            print(json.dumps(result, indent=2))
            print(summary(result), file=sys.stderr)
        finally:
            stop_server(proc)


if __name__ == "__main__":
    main()
