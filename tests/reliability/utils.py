"""Checks shared by the reliability tests: OpenAI's error body."""

from __future__ import annotations

import json

ERROR_FIELDS: dict[str, tuple[type, ...]] = {
    "message": (str,),
    "type": (str,),
    "param": (str, type(None)),
    "code": (str, type(None)),
}


def error_shape_problem(body: bytes) -> str | None:
    """Why `body` is not OpenAI's {"error": {message, type, param, code}}; None if it is."""
    try:
        data = json.loads(body)
    except ValueError:
        return "the body is not JSON"
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return "the body has no 'error' object"
    for name, types in ERROR_FIELDS.items():
        if name not in error:
            return f"error has no {name!r}"
        if not isinstance(error[name], types):
            return f"error.{name} is {type(error[name]).__name__}"
    return None
