"""Hostile inputs, one by one: each gets its exact status and OpenAI's error body naming the field.

Bodies are raw bytes sent with httpx, so a test controls exactly what goes on the wire (a lone
surrogate escape, integers past 64 bits, NaN, garbage). Every case on a generation route is
sent streamed as well: the error must come as the HTTP status, before any event stream starts.
The last tests check the server still answers normal requests after all of this.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.reliability.utils import error_shape_problem
from tests.server.utils import parse_stream, sse_events

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GENERATION_ROUTES = (CHAT, COMPLETIONS)
JSON = "application/json"
ANY_PARAM = "<any>"
TIMEOUT = 15.0  # a refusal (or a 2-token answer) is instant; longer means a hang  # the case names no single field (the body as a whole is wrong)

HUGE_INTS = {"2**64": 2**64, "-(2**64)-1": -(2**64) - 1, "10**30": 10**30}
USER_MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Hostile:
    """One hostile request and the answer it must get."""

    id: str
    path: str
    body: bytes
    status: int | frozenset[int]
    param: str | None  # the field, or a path inside it ("messages.0.content"); None: null
    method: str = "POST"
    content_type: str | None = JSON

    def streamed(self) -> Hostile:
        """The same request with "stream": true added to its JSON object."""
        assert self.body.startswith(b"{"), self.id
        return Hostile(
            f"{self.id}-stream",
            self.path,
            b'{"stream": true, ' + self.body[1:],
            self.status,
            self.param,
            self.method,
            self.content_type,
        )


def body(**fields: object) -> bytes:
    """A compact JSON object (Python's json escapes lone surrogates as \\uXXXX)."""
    return json.dumps(fields, separators=(",", ":")).encode()


def chat(**fields: object) -> bytes:
    """A small chat request body with `fields` set."""
    return body(**{"messages": USER_MESSAGES, "max_tokens": 2, **fields})


def completion(**fields: object) -> bytes:
    """A small completion request body with `fields` set."""
    return body(**{"prompt": "hi", "max_tokens": 2, **fields})


def _field_cases() -> Iterator[Hostile]:
    """Bad values of one field; each answer is 400 naming the field."""
    yield Hostile("tokenize-empty-messages", "/tokenize", b'{"messages": []}', 400, "messages")
    # a lone UTF-16 surrogate, written as the JSON escape; no UTF-8 encoding exists for it
    yield Hostile(
        "surrogate-prompt", COMPLETIONS, b'{"prompt": "a\\ud800b", "max_tokens": 2}', 400, "prompt"
    )
    yield Hostile("surrogate-tokenize", "/tokenize", b'{"prompt": "a\\ud800b"}', 400, "prompt")
    yield Hostile(
        "surrogate-stop",
        COMPLETIONS,
        b'{"prompt": "hi", "max_tokens": 2, "stop": "a\\udc00"}',
        400,
        "stop",
    )
    yield Hostile(
        "surrogate-stop-list",
        COMPLETIONS,
        b'{"prompt": "hi", "max_tokens": 2, "stop": ["ok", "a\\ud800"]}',
        400,
        "stop",
    )
    yield Hostile(
        "surrogate-chat-content",
        CHAT,
        b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}',
        400,
        "messages",
    )
    yield Hostile(
        "surrogate-chat-text-part",
        CHAT,
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}],'
        b' "max_tokens": 2}',
        400,
        "messages",
    )
    yield Hostile(
        "prompt-id-past-vocab", COMPLETIONS, completion(prompt=[999999999]), 400, "prompt"
    )
    yield Hostile(
        "prompt-id-negative-echo", COMPLETIONS, completion(prompt=[-1], echo=True), 400, "prompt"
    )
    yield Hostile(
        "prompt-ids-past-vocab-nested", COMPLETIONS, completion(prompt=[[5, 2**40]]), 400, "prompt"
    )
    for name, value in HUGE_INTS.items():
        for field in ("priority", "top_k", "seed"):
            yield Hostile(f"{field}={name}", COMPLETIONS, completion(**{field: value}), 400, field)
            yield Hostile(f"chat-{field}={name}", CHAT, chat(**{field: value}), 400, field)
        yield Hostile(
            f"stop_token_ids=[{name}]",
            COMPLETIONS,
            completion(stop_token_ids=[1, value]),
            400,
            "stop_token_ids",
        )
    yield Hostile("seed=2**64-1-n=2", COMPLETIONS, completion(seed=2**64 - 1, n=2), 400, "seed")
    yield Hostile("chat-seed=2**64-1-n=2", CHAT, chat(seed=2**64 - 1, n=2), 400, "seed")
    yield Hostile("n=100000", COMPLETIONS, completion(n=100_000), 400, "n")
    yield Hostile("chat-n=100000", CHAT, chat(n=100_000), 400, "n")
    stops = [f"s{i}" for i in range(1000)]
    yield Hostile("stop-1000-strings", COMPLETIONS, completion(stop=stops), 400, "stop")
    yield Hostile("chat-stop-1000-strings", CHAT, chat(stop=stops), 400, "stop")
    # 20,000 ids fit the 64 KiB body limit; 100,000 do not (that one is a 413, below)
    ids = [0] * 20_000
    yield Hostile(
        "stop_token_ids-20000", COMPLETIONS, completion(stop_token_ids=ids), 400, "stop_token_ids"
    )
    yield Hostile(
        "chat-stop_token_ids-20000", CHAT, chat(stop_token_ids=ids), 400, "stop_token_ids"
    )
    # the open server's anonymous key has priority 0; a request may not ask to jump ahead of it
    yield Hostile("priority-above-key", COMPLETIONS, completion(priority=-1000), 400, "priority")
    yield Hostile("chat-priority-above-key", CHAT, chat(priority=-1000), 400, "priority")
    yield Hostile(
        "temperature-NaN",
        COMPLETIONS,
        b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}',
        400,
        "temperature",
    )
    yield Hostile(
        "top_p-Infinity",
        COMPLETIONS,
        b'{"prompt": "hi", "max_tokens": 2, "top_p": Infinity}',
        400,
        "top_p",
    )
    yield Hostile(
        "max_tokens-1e400", COMPLETIONS, b'{"prompt": "hi", "max_tokens": 1e400}', 400, "max_tokens"
    )


def _body_cases() -> Iterator[Hostile]:
    """Bodies wrong as a whole: not JSON, not an object, wrong type, empty, too deep, too big."""
    for path in (CHAT, COMPLETIONS, "/tokenize", "/detokenize"):
        short = path.rsplit("/", 1)[-1]
        yield Hostile(f"{short}-not-json", path, b'{"prompt": "hi",', 400, ANY_PARAM)
        yield Hostile(f"{short}-not-utf8", path, b'{"prompt": "\xff\xfe"}', 400, ANY_PARAM)
        yield Hostile(f"{short}-empty-body", path, b"", 400, ANY_PARAM)
        for text in (b"[]", b'"x"', b"null", b"1"):
            yield Hostile(f"{short}-json-{text.decode()}", path, text, 400, ANY_PARAM)
        yield Hostile(
            f"{short}-text-plain",
            path,
            b'{"prompt": "hi"}',
            frozenset({400, 415}),
            ANY_PARAM,
            content_type="text/plain",
        )
        yield Hostile(
            f"{short}-form",
            path,
            b"prompt=hi&max_tokens=2",
            frozenset({400, 415}),
            ANY_PARAM,
            content_type="application/x-www-form-urlencoded",
        )
        yield Hostile(
            f"{short}-no-content-type",
            path,
            b'{"prompt": "hi"}',
            frozenset({400, 415}),
            ANY_PARAM,
            content_type=None,
        )
        deep = b"[" * 10_000 + b"]" * 10_000
        yield Hostile(
            f"{short}-10000-nested-lists", path, b'{"prompt": ' + deep + b"}", 400, ANY_PARAM
        )
        deep_objects = b'{"a": ' * 5_000 + b"1" + b"}" * 5_000
        yield Hostile(
            f"{short}-5000-nested-objects", path, b'{"x": ' + deep_objects + b"}", 400, ANY_PARAM
        )
        yield Hostile(f"{short}-over-body-limit", path, body(prompt="x" * 70_000), 413, None)
    yield Hostile(
        "stop_token_ids-100000-over-body-limit",
        COMPLETIONS,
        completion(stop_token_ids=[0] * 100_000),
        413,
        None,
    )


def _route_cases() -> Iterator[Hostile]:
    """Unknown routes (404) and known routes with the wrong method (405)."""
    yield Hostile("unknown-route-get", "/v1/nope", b"", 404, None, method="GET", content_type=None)
    yield Hostile("unknown-route-post", "/v1/nope", chat(), 404, None)
    # "/" is the web app's page; any other unknown path outside /v1 is the API's 404
    yield Hostile("unknown-route-root", "/nope", b"", 404, None, method="GET", content_type=None)
    yield Hostile("get-chat", CHAT, b"", 405, None, method="GET", content_type=None)
    yield Hostile("get-completions", COMPLETIONS, b"", 405, None, method="GET", content_type=None)
    yield Hostile("put-tokenize", "/tokenize", b"{}", 405, None, method="PUT")
    yield Hostile("delete-models", "/v1/models", b"", 405, None, method="DELETE", content_type=None)
    yield Hostile("post-health", "/health", b"{}", 405, None)


def _with_streamed(cases: Iterator[Hostile]) -> list[Hostile]:
    """Each case, and after it its streamed twin where it is a JSON object to a generation route."""
    out = []
    for case in cases:
        out.append(case)
        if case.path in GENERATION_ROUTES and case.body.startswith(b"{") and case.status != 413:
            out.append(case.streamed())
    return out


FIELD_CASES = _with_streamed(_field_cases())
BODY_CASES = _with_streamed(_body_cases())
ROUTE_CASES = list(_route_cases())


def send(
    http: httpx.Client,
    method: str,
    path: str,
    content: bytes | Iterator[bytes],
    content_type: str | None,
) -> httpx.Response:
    """One request, read whole; a dropped connection or a hang fails the test (the server's fault)."""
    headers = {} if content_type is None else {"content-type": content_type}
    try:
        return http.request(method, path, content=content, headers=headers, timeout=TIMEOUT)
    except httpx.TransportError as e:
        pytest.fail(f"{method} {path}: no HTTP answer within {TIMEOUT}s: {e!r}")


def check_refused(http: httpx.Client, case: Hostile) -> None:
    """Send `case`; assert its status, OpenAI's error body, and the field it names."""
    response = send(http, case.method, case.path, case.body, case.content_type)
    statuses = case.status if isinstance(case.status, frozenset) else frozenset({case.status})
    seen = (
        f"{case.id}: {response.status_code} {response.headers.get('content-type')} "
        + (response.text[:600])
    )
    assert not response.headers.get("content-type", "").startswith("text/event-stream"), (
        f"the error came inside an event stream, not as the HTTP status: {seen}"
    )
    assert response.status_code in statuses, f"expected {sorted(statuses)}; got {seen}"
    problem = error_shape_problem(response.content)
    assert problem is None, f"{problem}: {seen}"
    param = response.json()["error"]["param"]
    if case.param is None:
        assert param is None, f"expected param null: {seen}"
    elif case.param != ANY_PARAM:
        names_it = param == case.param or str(param).startswith(case.param + ".")
        assert names_it, f"expected param {case.param!r} (or a path inside it): {seen}"


@pytest.mark.parametrize("case", FIELD_CASES, ids=lambda c: c.id)
def test_bad_field_is_400_naming_it(http: httpx.Client, case: Hostile) -> None:
    """A bad value of one field: 400, OpenAI's body, `param` names the field."""
    check_refused(http, case)


@pytest.mark.parametrize("case", BODY_CASES, ids=lambda c: c.id)
def test_bad_body_is_4xx(http: httpx.Client, case: Hostile) -> None:
    """A body wrong as a whole: its 4xx with OpenAI's body, never a 5xx."""
    check_refused(http, case)


@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: c.id)
def test_bad_route_or_method(http: httpx.Client, case: Hostile) -> None:
    """Unknown route: 404; known route, wrong method: 405; both with OpenAI's body."""
    check_refused(http, case)


def test_chunked_body_over_limit_is_413(http: httpx.Client) -> None:
    """A chunked upload (no Content-Length) past the body limit is counted as it comes: 413."""
    chunks = [b'{"prompt": "'] + [b"x" * 8192] * 10 + [b'", "max_tokens": 2}']
    response = send(http, "POST", COMPLETIONS, iter(chunks), JSON)
    assert response.status_code == 413, response.text[:600]
    assert error_shape_problem(response.content) is None, response.text[:600]


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        pytest.param(COMPLETIONS, completion(priority=0), id="priority-equal-to-key"),
        pytest.param(COMPLETIONS, completion(priority=10), id="priority-below-key"),
        pytest.param(CHAT, chat(priority=10, n=2, seed=2**63 - 1), id="chat-priority-n2-seed"),
        pytest.param(COMPLETIONS, completion(stop=["a", "b"], stop_token_ids=[0]), id="stops"),
    ],
)
def test_values_near_the_limits_are_accepted(http: httpx.Client, path: str, payload: bytes) -> None:
    """The refusals above are not blanket ones: nearby allowed values still answer 200."""
    response = send(http, "POST", path, payload, JSON)
    assert response.status_code == 200, response.text[:600]


def test_still_answers_chat_after_hostile_inputs(http: httpx.Client) -> None:
    """After everything above, a normal chat request (plain and streamed) still gets 200."""
    response = send(http, "POST", CHAT, chat(max_tokens=4), JSON)
    assert response.status_code == 200, response.text[:600]
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
    response = send(http, "POST", CHAT, chat(max_tokens=4, stream=True), JSON)
    assert response.status_code == 200, response.text[:600]
    chunks, _ = parse_stream(list(sse_events(iter(response.text.splitlines()))))
    assert chunks and all("error" not in c for c in chunks), chunks
    assert send(http, "GET", "/ready", b"", None).status_code == 200
