"""Secrets and limits: password hashes, session tokens, the session cookie, CSRF, rate limits.

Nothing here touches the database; `auth.py` builds the request dependencies on top of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Response

SESSION_COOKIE = "surge_session"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_hasher = PasswordHasher()  # argon2id with the library's (RFC 9106 low-memory) parameters
_dummy_hash: str | None = None


def _dummy() -> str:
    """Verified against when the user doesn't exist: a wrong name costs what a wrong password
    does. Made on first use, not at import."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = _hasher.hash(secrets.token_hex(16))
    return _dummy_hash


async def hash_password(password: str) -> str:
    """argon2id hash, computed off the event loop (it takes tens of ms of CPU on purpose)."""
    return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    """True when `password` matches; a None hash (unknown user) costs the same and fails."""

    def verify() -> bool:
        try:
            return _hasher.verify(password_hash or _dummy(), password) and bool(password_hash)
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(verify)


def new_token() -> str:
    """A random URL-safe token (256 bits)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What the store keeps of a session token: its sha256 (a leaked table logs no one in)."""
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_matches(expected: str, sent: str | None) -> bool:
    """Constant-time comparison of the session's CSRF token with the header's."""
    return sent is not None and hmac.compare_digest(expected.encode(), sent.encode())


def set_session_cookie(response: Response, token: str, max_age_s: float, secure: bool) -> None:
    """HttpOnly (no script reads it), SameSite=Lax (no cross-site POST carries it)."""
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(max_age_s),
        httponly=True,
        samesite="lax",
        secure=secure,
        path="/",
    )


def clear_session_cookie(response: Response, secure: bool) -> None:
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="lax", secure=secure, path="/")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


@dataclass(slots=True)
class RateLimiter:
    """A token bucket per key: `max_per_minute` requests in a burst, refilled at that rate.

    `clock` is injectable so tests need no sleeping. Buckets that have refilled are forgotten,
    so memory stays bounded by the keys active in the last minute.
    """

    max_per_minute: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _last_sweep: float = 0.0

    def allow(self, key: str) -> bool:
        """Take one token for `key`; False when its bucket is empty."""
        now = self.clock()
        self._sweep(now)
        rate = self.max_per_minute / 60.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.max_per_minute), now)
        bucket.tokens = min(self.max_per_minute, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def retry_after_s(self, key: str) -> float:
        """Seconds until `key` has one token again."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        return max(0.0, (1.0 - bucket.tokens) * 60.0 / self.max_per_minute)

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < 60.0:
            return
        self._last_sweep = now
        full_after = 60.0  # an untouched bucket is full again after a minute
        stale = [k for k, b in self._buckets.items() if now - b.updated >= full_after]
        for key in stale:
            del self._buckets[key]
