"""Who is asking: the session cookie, checked in one place.

Every route that needs a user depends on `current_user` (alias `CurrentUser`), which
1. finds the session by the sha256 of the `surge_session` cookie (unexpired, user not disabled),
   else 401;
2. on POST/PUT/PATCH/DELETE requires the session's CSRF token in the `X-CSRF-Token` header
   (compared in constant time), else 403;
3. takes one token from the user's rate-limit bucket, else 429.
`require_admin` (alias `AdminUser`) adds: the user is an admin, else 403. Other parts of the app
(knowledge bases) use these same dependencies and the `users.id` integer as their owner column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request, Response
from sqlalchemy import delete, select

from surge.app.deps import AppState, Db, State
from surge.app.errors import AppError
from surge.app.models import AuthSession, User, utcnow
from surge.app.security import (
    CSRF_HEADER,
    SESSION_COOKIE,
    UNSAFE_METHODS,
    csrf_matches,
    hash_token,
    new_token,
    set_session_cookie,
)

__all__ = [
    "AdminUser",
    "CurrentUser",
    "Login",
    "check_rate",
    "current_login",
    "current_user",
    "require_admin",
    "start_session",
]


@dataclass(frozen=True, slots=True)
class Login:
    """A live session and its user."""

    session: AuthSession
    user: User


async def current_login(request: Request, db: Db) -> Login:
    """The request's live session, CSRF-checked on changes (no rate limit: see current_user)."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise AppError(401, "not_logged_in", "log in first")
    row = (
        await db.execute(
            select(AuthSession, User)
            .join(User, User.id == AuthSession.user_id)
            .where(AuthSession.token_hash == hash_token(token))
        )
    ).first()
    if row is None or row[0].expires_at <= utcnow() or row[1].disabled:
        raise AppError(401, "not_logged_in", "the session has ended; log in again")
    session, user = row
    if request.method in UNSAFE_METHODS and not csrf_matches(
        session.csrf_token, request.headers.get(CSRF_HEADER)
    ):
        raise AppError(403, "csrf", f"missing or wrong {CSRF_HEADER} header")
    return Login(session, user)


def check_rate(state: AppState, key: str) -> None:
    """429 with Retry-After when `key` has used its requests for now."""
    if not state.limiter.allow(key):
        retry = max(1, math.ceil(state.limiter.retry_after_s(key)))
        raise AppError(
            429,
            "rate_limited",
            f"too many requests; try again in {retry} s",
            headers={"Retry-After": str(retry)},
        )


async def current_user(state: State, login: Annotated[Login, Depends(current_login)]) -> User:
    """The logged-in, enabled user (CSRF-checked on changes, rate-limited)."""
    check_rate(state, f"user:{login.user.id}")
    return login.user


async def require_admin(user: Annotated[User, Depends(current_user)]) -> User:
    """The current user, who must be an admin."""
    if not user.is_admin:
        raise AppError(403, "forbidden", "admins only")
    return user


CurrentUser = Annotated[User, Depends(current_user)]
AdminUser = Annotated[User, Depends(require_admin)]


async def start_session(
    request: Request, response: Response, db: Db, state: AppState, user: User
) -> AuthSession:
    """Log `user` in with a fresh token (never the one the browser had: no session fixation);
    the browser's previous session, if any, ends. Commits."""
    now = utcnow()
    old = request.cookies.get(SESSION_COOKIE)
    stale = AuthSession.expires_at <= now
    if old:
        stale = stale | (AuthSession.token_hash == hash_token(old))
    await db.execute(delete(AuthSession).where(stale))
    token = new_token()
    session = AuthSession(
        token_hash=hash_token(token),
        csrf_token=new_token(),
        user_id=user.id,
        expires_at=now + timedelta(seconds=state.config.session_ttl_s),
    )
    db.add(session)
    await db.commit()
    set_session_cookie(response, token, state.config.session_ttl_s, state.config.secure_cookies)
    return session
