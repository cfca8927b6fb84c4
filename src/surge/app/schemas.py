"""The app's wire types (pydantic, at the HTTP edge only)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from surge.app.models import MessageStatus, Role

USERNAME_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"


class Credentials(BaseModel):
    """Sign-up and log-in."""

    model_config = ConfigDict(extra="forbid")

    username: str = Field(pattern=USERNAME_PATTERN)
    password: str = Field(min_length=8, max_length=1024)


class NewUser(Credentials):
    """An account the admin adds."""

    role: Role = Role.USER


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    role: Role
    disabled: bool
    created_at: datetime


class UserUsage(UserOut):
    """What the admin sees of each user: the account and its cumulative usage."""

    num_requests: int
    num_tokens_in: int
    num_tokens_out: int


class Me(BaseModel):
    """The logged-in user and the CSRF token to send as X-CSRF-Token on every change."""

    user: UserOut
    csrf_token: str


class UserPatch(BaseModel):
    """What the admin may change about a user."""

    model_config = ConfigDict(extra="forbid")

    disabled: bool | None = None
    role: Role | None = None


class Settings(BaseModel):
    signup_open: bool


class AdminSettings(Settings):
    """The run-time settings the admin sees: sign-up, and whether a knowledge-base follow-up
    ("and its price?") is rewritten by the chat model into a standalone query before searching
    (one more request per follow-up; off: the earlier questions are searched with it)."""

    rewrite_queries: bool = False


class AdminSettingsIn(BaseModel):
    """A change of run-time settings: only the fields sent change."""

    model_config = ConfigDict(extra="forbid")

    signup_open: bool | None = None
    rewrite_queries: bool | None = None


class ConversationIn(BaseModel):
    """Creating a conversation (every field optional) or changing one (only the fields sent)."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, max_length=200)
    model: str | None = Field(default=None, max_length=200)
    system_prompt: str | None = Field(default=None, max_length=100_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)


class ConversationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    model: str | None
    system_prompt: str
    temperature: float | None
    created_at: datetime
    updated_at: datetime


class MessageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    role: str
    content: str
    status: MessageStatus
    error: str | None
    model: str | None
    num_tokens_in: int | None
    num_tokens_out: int | None
    created_at: datetime


class ConversationDetail(ConversationOut):
    messages: list[MessageOut]


class MessageIn(BaseModel):
    """A user message to send (or the new text of an edited one)."""

    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1, max_length=1_000_000)

    @field_validator("content")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the message is empty")
        return v


class ModelsOut(BaseModel):
    """The chat models the service offers."""

    models: list[str]
