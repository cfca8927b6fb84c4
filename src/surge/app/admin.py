"""Admin routes: users (add, disable, role, usage) and the run-time settings (sign-up on/off,
the rewriting of knowledge-base follow-ups)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from surge.app.auth import AdminUser
from surge.app.config import AppConfig
from surge.app.deps import Db, State
from surge.app.errors import AppError, not_found
from surge.app.kb_query import REWRITE_QUERIES, rewrite_enabled
from surge.app.models import AuthSession, Setting, User
from surge.app.schemas import AdminSettings, AdminSettingsIn, NewUser, UserOut, UserPatch, UserUsage
from surge.app.security import hash_password

router = APIRouter(prefix="/api/admin", tags=["admin"])

SIGNUP_OPEN = "signup_open"


async def signup_open(db: AsyncSession, config: AppConfig) -> bool:
    """Whether anyone may sign up: the admin's setting, else the configured default."""
    row = await db.get(Setting, SIGNUP_OPEN)
    return config.signup_open if row is None else row.value == "1"


async def add_user(db: AsyncSession, username: str, password: str, role: str) -> User:
    """Insert a user (409 when the name is taken). Commits."""
    user = User(username=username, password_hash=await hash_password(password), role=role)
    db.add(user)
    try:
        await db.commit()
    except IntegrityError as e:
        await db.rollback()
        raise AppError(409, "username_taken", f"the username {username!r} is taken") from e
    return user


@router.get("/users", operation_id="admin_list_users")
async def list_users(_admin: AdminUser, db: Db) -> list[UserUsage]:
    """Every user with their usage: requests to the model service, tokens in and out."""
    users = (await db.scalars(select(User).order_by(User.id))).all()
    return [UserUsage.model_validate(u) for u in users]


@router.post("/users", status_code=201, operation_id="admin_add_user")
async def create_user(body: NewUser, _admin: AdminUser, db: Db) -> UserOut:
    """Add an account (works with sign-up switched off)."""
    return UserOut.model_validate(await add_user(db, body.username, body.password, body.role))


@router.patch("/users/{user_id}", operation_id="admin_update_user")
async def update_user(user_id: int, body: UserPatch, admin: AdminUser, db: Db) -> UserOut:
    """Disable/enable a user or change their role; a disabled user's sessions end at once."""
    user = await db.get(User, user_id)
    if user is None:
        raise not_found("user")
    if user.id == admin.id and (body.disabled or (body.role and body.role != user.role)):
        raise AppError(400, "self_lockout", "an admin can't disable or demote themselves")
    if body.role is not None:
        user.role = body.role
    if body.disabled is not None:
        user.disabled = body.disabled
        if body.disabled:
            await db.execute(delete(AuthSession).where(AuthSession.user_id == user.id))
    await db.commit()
    return UserOut.model_validate(user)


async def _settings(db: AsyncSession, config: AppConfig) -> AdminSettings:
    return AdminSettings(
        signup_open=await signup_open(db, config), rewrite_queries=await rewrite_enabled(db)
    )


@router.get("/settings", operation_id="admin_get_settings")
async def get_settings(_admin: AdminUser, db: Db, state: State) -> AdminSettings:
    return await _settings(db, state.config)


@router.put("/settings", operation_id="admin_put_settings")
async def put_settings(
    body: AdminSettingsIn, _admin: AdminUser, db: Db, state: State
) -> AdminSettings:
    """Switch sign-up, or the rewriting of knowledge-base follow-ups, on or off (kept in the
    store, so it survives a restart); the fields left out stay as they are."""
    for key, value in ((SIGNUP_OPEN, body.signup_open), (REWRITE_QUERIES, body.rewrite_queries)):
        if value is not None:
            await db.merge(Setting(key=key, value="1" if value else "0"))
    await db.commit()
    return await _settings(db, state.config)
