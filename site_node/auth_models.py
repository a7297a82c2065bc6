"""Tables and API models of the site API's accounts: users (password + TOTP) and service-account API tokens."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum

import sqlalchemy as sa
from sqlmodel import Column, Field, SQLModel

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def utcnow() -> datetime:
    """Timezone-aware now (UTC)."""
    return datetime.now(timezone.utc)


class Role(str, Enum):
    """What a caller may do: clinicians read and review patients, site admins manage accounts, auditors read logs."""

    clinician = "clinician"
    site_admin = "site_admin"
    auditor = "auditor"


# --------------------------------------------------------------------------- users


class UserBase(SQLModel):
    """Columns shared by the user table and its views."""

    username: str = Field(min_length=1, max_length=64, schema_extra={"pattern": NAME_PATTERN})
    role: Role


class UserCreate(UserBase):
    """A new user with a password (the TOTP secret is generated)."""

    password: str = Field(min_length=12, max_length=256)


class UserUpdate(SQLModel):
    """Changes to a user; a change of role or disabling ends the user's sessions."""

    role: Role | None = None
    disabled: bool | None = None


class SiteUser(SQLModel, table=True):
    """A person who logs in to the site API (roles are stored as text: the same schema on SQLite and PostgreSQL)."""

    __tablename__ = "site_user"

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(max_length=64, sa_column_kwargs={"unique": True})
    role: str = Field(sa_column=Column(sa.String(32), nullable=False))
    password_hash: str
    totp_sealed: bytes = Field(sa_column=Column(sa.LargeBinary, nullable=False))  # AES-GCM, bound to the username
    disabled: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(sa.DateTime(timezone=True), nullable=False))


class UserPublic(UserBase):
    """A user as the API shows it (never a hash or the TOTP secret)."""

    id: int
    disabled: bool
    created_at: datetime


class UserCreated(UserPublic):
    """A new user and its TOTP enrolment, shown exactly once."""

    totp_secret: str
    totp_uri: str


# --------------------------------------------------------------------------- API tokens


class ApiTokenBase(SQLModel):
    """A service account's token: its name and the role it acts with."""

    name: str = Field(min_length=1, max_length=64, schema_extra={"pattern": NAME_PATTERN})
    role: Role


class ApiTokenCreate(ApiTokenBase):
    """A token to issue."""


class ApiToken(SQLModel, table=True):
    """An issued token, stored only as its sha256 (256-bit random tokens need no password hashing)."""

    __tablename__ = "site_api_token"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64)
    role: str = Field(sa_column=Column(sa.String(32), nullable=False))
    token_hash: str = Field(max_length=64, sa_column_kwargs={"unique": True})
    hint: str = Field(max_length=16)
    created_by: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(sa.DateTime(timezone=True), nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(sa.DateTime(timezone=True), nullable=True))


class ApiTokenPublic(ApiTokenBase):
    """A token as the API lists it (the hint is its first characters, never the token)."""

    id: int
    hint: str
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


class ApiTokenIssued(ApiTokenPublic):
    """A new token, shown exactly once."""

    token: str
