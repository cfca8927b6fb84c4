"""Sign-up, log-in, log-out and who-am-I."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import delete, func, select

from surge.app.admin import add_user, signup_open
from surge.app.auth import CurrentUser, Login, check_rate, current_login, start_session
from surge.app.db import LockKind, store_lock
from surge.app.deps import Db, State
from surge.app.errors import AppError
from surge.app.models import AuthSession, Role, User
from surge.app.schemas import Credentials, Me, Settings, UserOut
from surge.app.security import clear_session_cookie, verify_password

router = APIRouter(prefix="/api", tags=["accounts"])

# Log-in and sign-up carry no CSRF token (there is no session yet); they accept only a JSON
# body, which a cross-site form can't send and cross-site fetch can't send without CORS.


def _client_key(request: Request) -> str:
    return f"ip:{request.client.host if request.client else 'unknown'}"


@router.get("/settings", operation_id="public_settings")
async def public_settings(db: Db, state: State) -> Settings:
    """What the log-in page needs before anyone logs in: whether sign-up is open."""
    return Settings(signup_open=await signup_open(db, state.config))


@router.post("/signup", status_code=201, operation_id="signup")
async def signup(
    body: Credentials, request: Request, response: Response, db: Db, state: State
) -> Me:
    """Create an account and log it in; the first account is the admin (even with sign-up off)."""
    check_rate(state, _client_key(request))
    # two first sign-ups at once, in one process or several: only one becomes admin
    async with store_lock(db, state.signup_lock, LockKind.SIGNUP):
        first = (await db.scalar(select(func.count()).select_from(User))) == 0
        if not first and not await signup_open(db, state.config):
            raise AppError(403, "signup_closed", "sign-up is closed; ask an admin for an account")
        user = await add_user(db, body.username, body.password, Role.ADMIN if first else Role.USER)
    session = await start_session(request, response, db, state, user)
    return Me(user=UserOut.model_validate(user), csrf_token=session.csrf_token)


@router.post("/login", operation_id="login")
async def login(
    body: Credentials, request: Request, response: Response, db: Db, state: State
) -> Me:
    """Check the password and start a new session (a new cookie at each log-in)."""
    check_rate(state, _client_key(request))
    user = await db.scalar(select(User).where(User.username == body.username))
    matches = await verify_password(user.password_hash if user else None, body.password)
    if user is None or not matches:
        raise AppError(401, "wrong_credentials", "wrong username or password")
    if user.disabled:
        raise AppError(403, "account_disabled", "this account is disabled")
    session = await start_session(request, response, db, state, user)
    return Me(user=UserOut.model_validate(user), csrf_token=session.csrf_token)


@router.post("/logout", status_code=204, operation_id="logout")
async def logout(
    login: Annotated[Login, Depends(current_login)], response: Response, db: Db, state: State
) -> None:
    """End this session (server-side: the cookie is worthless afterwards)."""
    await db.execute(delete(AuthSession).where(AuthSession.id == login.session.id))
    await db.commit()
    clear_session_cookie(response, state.config.secure_cookies)


@router.get("/me", operation_id="me")
async def me(user: CurrentUser, login: Annotated[Login, Depends(current_login)]) -> Me:
    """The logged-in user and the session's CSRF token."""
    return Me(user=UserOut.model_validate(user), csrf_token=login.session.csrf_token)
