"""The app's errors: one exception type, one JSON shape ({"error": {"message", "code"}})."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse


class AppError(Exception):
    """An error a route raises on purpose; it becomes a JSON answer with `status`."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def not_found(what: str) -> AppError:
    """404: also what another user's object looks like (its existence is not revealed)."""
    return AppError(404, "not_found", f"{what} not found")


async def app_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)  # registered for AppError only
    return JSONResponse(
        {"error": {"message": exc.message, "code": exc.code}},
        status_code=exc.status,
        headers=exc.headers,
    )
