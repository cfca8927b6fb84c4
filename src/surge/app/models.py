"""The app's tables for accounts and chat. Other parts of the app (knowledge bases) refer to
`users.id` (an integer) as their owner column."""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from surge.app.db import Base


def _values(enum_type: type[enum.Enum]) -> list[str]:
    return [str(m.value) for m in enum_type]


def utcnow() -> datetime:
    """Timezone-aware now (stored as UTC)."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no zone: store naive UTC, read aware)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Role(str, enum.Enum):
    ADMIN = "admin"
    USER = "user"


class MessageStatus(str, enum.Enum):
    """How an assistant message ended; a user message is always COMPLETE."""

    COMPLETE = "complete"
    STOPPED = "stopped"  # the user stopped the stream: the partial text is kept
    ERROR = "error"  # the service failed: the partial text and the reason are kept


class User(Base):
    """An account. `role` admin can manage users and settings; usage counters are cumulative."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(
        Enum(Role, native_enum=False, length=16, values_callable=_values), default=Role.USER
    )
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    num_requests: Mapped[int] = mapped_column(Integer, default=0)  # requests to the model service
    num_tokens_in: Mapped[int] = mapped_column(Integer, default=0)  # prompt tokens
    num_tokens_out: Mapped[int] = mapped_column(Integer, default=0)  # completion tokens

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


class AuthSession(Base):
    """A logged-in browser: only the sha256 of its cookie token is stored."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Setting(Base):
    """Settings the admin changes at run time (one row per key, JSON-free: text values)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class Conversation(Base):
    """A chat owned by one user, with its own model, system prompt and temperature."""

    __tablename__ = "conversations"
    __table_args__ = {"sqlite_autoincrement": True}  # ids never reused after a delete

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(String(200), default="")
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    temperature: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        order_by="Message.id",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class Message(Base):
    """One turn; the order of a conversation is the order of ids."""

    __tablename__ = "messages"
    __table_args__ = {"sqlite_autoincrement": True}  # a regenerated answer gets a new id

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(16))  # "user" | "assistant"
    content: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[MessageStatus] = mapped_column(
        Enum(MessageStatus, native_enum=False, length=16, values_callable=_values),
        default=MessageStatus.COMPLETE,
    )
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    num_tokens_in: Mapped[int | None] = mapped_column(Integer, nullable=True)
    num_tokens_out: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    conversation: Mapped[Conversation] = relationship(back_populates="messages")
