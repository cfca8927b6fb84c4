"""Schemathesis over every route of the server's own OpenAPI schema: no 5xx, 4xx as OpenAI's body.

The schema is read from the running server (`GET /openapi.json`), so a route added later is
fuzzed without touching this file. Each operation is fuzzed in both of schemathesis' generation
modes (positive: bodies the schema allows; negative: bodies and values it forbids), and every
case is sent and checked; failures are collected, grouped and reported together at the end.

    SURGE_FUZZ_CASES=20000 python -m pytest tests/reliability/test_fuzz.py -s   # longer run
    SURGE_FUZZ_SEED=7 ...                                                       # other cases
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy
from schemathesis import Case, GenerationMode

from tests.reliability.utils import error_shape_problem
from tests.server.utils import RemoteSurgeServer

FUZZ_CASES = int(os.environ.get("SURGE_FUZZ_CASES", "1000"))
FUZZ_SEED = int(os.environ.get("SURGE_FUZZ_SEED", "0"))
REQUEST_TIMEOUT = 30.0
MAX_TIMEOUTS = 3  # requests that got no answer in REQUEST_TIMEOUT: the server hangs; stop
# Fields that multiply the work of one request: kept small so 1,000 cases take a few minutes.
# Only large values are cut down; negative, zero, fractional and non-numeric ones go out as made.
COST_FIELDS = ("max_tokens", "max_completion_tokens", "n", "best_of")
MAX_COST = 4
MAX_ROUNDS = 6  # rounds of redistributing the cases of operations whose inputs ran out
EXAMPLES_PER_GROUP = 2


@dataclass(slots=True)
class Failure:
    """One case the server answered wrongly."""

    label: str
    kind: str
    status: int | None
    detail: str
    curl: str
    body: str

    def group(self) -> tuple[str, str, int | None, str]:
        """Failures alike but for their values (digits and quoted text masked)."""
        masked = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", self.detail)
        return self.label, self.kind, self.status, re.sub(r"\d+", "N", masked)[:120]


@dataclass(slots=True)
class FuzzRun:
    """What was sent and what went wrong."""

    server: RemoteSurgeServer
    model: str
    num_cases: int = 0
    num_5xx: int = 0
    per_operation: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    num_timeouts: int = 0
    stopped: str | None = None  # why the run stopped early

    def fail(self, case: Case, kind: str, detail: str, status: int | None, body: bytes) -> None:
        curl = case.as_curl_command(base_url=self.server.base_url)
        self.failures.append(
            Failure(
                case.operation.label,
                kind,
                status,
                detail,
                _cut(curl, 800),
                _cut(body.decode(errors="replace"), 600),
            )
        )

    def report(self) -> str:
        """All failures, grouped (count, then a few examples of each group)."""
        groups: dict[tuple[str, str, int | None, str], list[Failure]] = {}
        for f in self.failures:
            groups.setdefault(f.group(), []).append(f)
        lines = [
            f"{len(self.failures)} failing cases of {self.num_cases} ({self.num_5xx} 5xx), "
            f"in {len(groups)} groups:"
        ]
        for (label, kind, status, _), members in sorted(groups.items(), key=lambda g: -len(g[1])):
            lines.append(f"\n== {label}: {kind} (status {status}) x{len(members)}")
            for f in members[:EXAMPLES_PER_GROUP]:
                lines += [f"  {f.detail}", f"  request: {f.curl}", f"  response: {f.body}"]
        if self.stopped is not None:
            lines.append(
                f"\nstopped early: {self.stopped}; the server's log:\n{self.server.read_log()}"
            )
        return "\n".join(lines)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def _is_big(value: object) -> bool:
    """A number (or numeric string, which pydantic coerces) above MAX_COST."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value > MAX_COST
    return (
        isinstance(value, str)
        and re.fullmatch(r"\s*\+?\d+\s*", value, re.ASCII) is not None
        and int(value) > MAX_COST
    )


def make_cheap(case: Case, index: int, model: str) -> None:
    """Cut the cost fields of a JSON body down; every other field keeps its generated value.

    A body with no max-tokens field gets one where the schema has it (chat's default is the
    whole context). Where the schema has `stream`, a boolean or absent one is set to stream every
    other case (the generator leaves it out or false almost always), so both paths are fuzzed.
    Two string `model`s in three name the served model, so that most cases get past the 404
    for an unknown model to the checks behind it.
    """
    if not isinstance(case.body, dict):
        return
    body = dict(case.body)
    if isinstance(body.get("model"), str) and index % 3:
        body["model"] = model
    for name in COST_FIELDS:
        if _is_big(body.get(name)):
            body[name] = 1 + index % MAX_COST
    properties = _body_properties(case)
    if "max_tokens" in properties and not {"max_tokens", "max_completion_tokens"} & set(body):
        body["max_tokens"] = MAX_COST
    if "stream" in properties and isinstance(body.get("stream", False), bool):
        body["stream"] = index % 2 == 0
    case.body = body


def _body_properties(case: Case) -> set[str]:
    """Top-level property names of the operation's JSON request body (refs resolved)."""
    spec = case.operation.schema.raw_schema
    node = (
        spec["paths"][case.operation.path][case.method.lower()]
        .get("requestBody", {})
        .get("content", {})
        .get("application/json", {})
        .get("schema", {})
    )
    while "$ref" in node:
        *_, name = node["$ref"].split("/")
        node = spec["components"]["schemas"][name]
    return set(node.get("properties", {}))


def stream_problem(body: bytes, cut_short: bool) -> str | None:
    """A 200 event stream that carries an error event or never ends with [DONE]."""
    events = [
        line[len("data: ") :]
        for line in body.decode(errors="replace").splitlines()
        if line.startswith("data: ")
    ]
    for event in events:
        if event == "[DONE]":
            continue
        try:
            chunk = json.loads(event)
        except ValueError:
            return f"non-JSON event in a 200 stream: {_cut(event, 300)}"
        if isinstance(chunk, dict) and "error" in chunk:
            return f"error event in a 200 stream: {_cut(event, 300)}"
    if not cut_short and (not events or events[-1] != "[DONE]"):
        return "200 stream does not end with [DONE]"
    return None


def judge(status: int, content_type: str, body: bytes, cut_short: bool) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with an answer; None if nothing is."""
    if status >= 500:
        return "5xx", _cut(body.decode(errors="replace"), 200)
    if 400 <= status < 500:
        shape = error_shape_problem(body)
        return None if shape is None else ("4xx body is not OpenAI's error", shape)
    if status == 200 and content_type.startswith("text/event-stream"):
        problem = stream_problem(body, cut_short)
        return None if problem is None else ("bad 200 stream", problem)
    return None


def send(run: FuzzRun, case: Case) -> None:
    """Send one case and record what is wrong with the answer (nothing once the run stopped)."""
    if run.stopped:
        return
    make_cheap(case, run.num_cases, run.model)
    run.num_cases += 1
    run.per_operation[case.operation.label] += 1
    try:
        response = case.call(timeout=REQUEST_TIMEOUT)
    except (requests.RequestException, OSError) as e:  # OSError: TimeoutError mid-stream
        timed_out = isinstance(e, (requests.Timeout, TimeoutError))
        run.fail(case, "timeout" if timed_out else "no response", repr(e), None, b"")
        run.num_timeouts += timed_out
        if run.server.proc.poll() is not None:
            run.stopped = f"the server exited with {run.server.proc.returncode}"
        elif run.num_timeouts >= MAX_TIMEOUTS:
            run.stopped = f"{run.num_timeouts} requests got no answer in {REQUEST_TIMEOUT:g}s"
        return
    run.statuses[response.status_code] += 1
    if response.status_code >= 500:
        run.num_5xx += 1
    content_type = response.headers.get("content-type", [""])[0]
    wrong = judge(response.status_code, content_type, response.content, response.stream_cut_short)
    if wrong is not None:
        run.fail(case, *wrong, response.status_code, response.content)


def fuzz_strategy(
    strategy: SearchStrategy[Case], max_examples: int, seed: int, on_case: Callable[[Case], None]
) -> int:
    """Draw up to `max_examples` cases (fewer if the inputs run out); the number drawn."""
    drawn = 0

    @hypothesis.seed(seed)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=strategy)
    def draw(case: Case) -> None:
        nonlocal drawn
        drawn += 1
        on_case(case)

    try:
        draw()
    except Unsatisfiable:  # e.g. the negative mode of an operation that takes no input
        pass
    return drawn


def fuzz_schema(schema: schemathesis.BaseSchema, run: FuzzRun, target: int, seed: int) -> None:
    """At least `target` cases over every operation and generation mode, spread evenly; the
    share of an operation whose inputs run out (GET /health has one) goes to the others."""
    slots = [
        (op.ok().label, mode, op.ok().as_strategy(generation_mode=mode))
        for op in schema.get_all_operations()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    for round_ in range(MAX_ROUNDS):
        if run.num_cases >= target or not slots or run.stopped:
            return
        share = math.ceil((target - run.num_cases) / len(slots))
        still_going = []
        for i, (label, mode, strategy) in enumerate(slots):
            slot_seed = seed + 1_000_003 * round_ + i
            if fuzz_strategy(strategy, share, slot_seed, lambda c: send(run, c)) >= share:
                still_going.append((label, mode, strategy))
            if run.stopped:
                return
        slots = still_going


@pytest.fixture(scope="module")
def api_schema(server: RemoteSurgeServer) -> schemathesis.BaseSchema:
    """The server's own OpenAPI schema, loaded from its URL."""
    config = schemathesis.Config.from_dict(
        {
            "base-url": server.base_url,
            "request-timeout": REQUEST_TIMEOUT,
            "max-stream-events": 100_000,  # read whole streams, to see their end
            # the default masks "secret-like" keys in reports, and "max_tokens" looks like one
            "output": {"sanitization": {"enabled": False}},
        }
    )
    return schemathesis.openapi.from_url(server.url("/openapi.json"), config=config)


@pytest.mark.timeout(max(900, FUZZ_CASES))
def test_fuzz_every_route(
    api_schema: schemathesis.BaseSchema, server: RemoteSurgeServer, model_name: str
) -> None:
    """FUZZ_CASES cases over every route: no 5xx, and every 4xx in OpenAI's error shape."""
    labels = [op.ok().label for op in api_schema.get_all_operations()]
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /health"} <= set(labels)
    run = FuzzRun(server, model_name)
    start = time.monotonic()
    fuzz_schema(api_schema, run, FUZZ_CASES, FUZZ_SEED)
    elapsed = time.monotonic() - start
    summary = (
        f"fuzz: {run.num_cases} cases in {elapsed:.0f}s (seed {FUZZ_SEED}), {run.num_5xx} 5xx, "
        f"{len(run.failures)} failing; per operation {dict(run.per_operation)}; "
        f"statuses {dict(sorted(run.statuses.items()))}"
    )
    print(summary)
    assert not run.failures, summary + "\n" + run.report()
    assert run.num_cases >= FUZZ_CASES, summary
    assert set(run.per_operation) == set(labels), summary


@pytest.mark.parametrize(
    ("status", "content_type", "body", "kind"),
    [
        (500, "text/plain", b"Internal Server Error", "5xx"),
        (400, "application/json", b'{"detail": "bad"}', "4xx body is not OpenAI's error"),
        (422, "application/json", b'{"error": {"message": "m", "type": "t"}}', "4xx"),
        (404, "text/plain", b"Not Found", "4xx"),
        (200, "text/event-stream", b'data: {"error": {"message": "x"}}\n\n', "bad 200 stream"),
        (200, "text/event-stream", b'data: {"choices": []}\n\n', "bad 200 stream"),
        (
            400,
            "application/json",
            b'{"error": {"message": "m", "type": "t", "param": null, "code": null}}',
            None,
        ),
        (200, "text/event-stream", b'data: {"choices": []}\n\ndata: [DONE]\n\n', None),
    ],
)
def test_judge(status: int, content_type: str, body: bytes, kind: str | None) -> None:
    """The checks themselves (no server): they flag what they should, and only that."""
    wrong = judge(status, content_type, body, cut_short=False)
    assert (wrong is None) == (kind is None), wrong
    assert wrong is None or kind is not None and wrong[0].startswith(kind)
