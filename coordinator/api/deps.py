"""Dependencies of the API routes, as Annotated aliases; access checks are dependencies too.

The dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in the thread
pool, and those hops cost more than the dependencies themselves. Routes stay plain `def` (their
queries run in the pool).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

import anyio
import sqlalchemy as sa
from fastapi import Depends, Path, Request
from fastapi.security import OAuth2PasswordBearer
from sqlmodel import Session, select

from evoclone.federated.api_deps import app_engine, app_settings, request_id, role_gate, unauthorized

from ..models import MAX_ID, User
from ..security import ACCESS, TokenError, decode_token
from ..settings import CoordinatorSettings

oauth2 = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)
SettingsDep = Annotated[CoordinatorSettings, Depends(app_settings)]
EngineDep = Annotated[sa.Engine, Depends(app_engine)]


async def get_session(engine: EngineDep) -> AsyncIterator[Session]:
    """A database session for one request; routes commit what they change.

    Opening one does no I/O (it connects on first use, in the route's thread); closing it returns the
    connection to the pool, inline for SQLite (a local call) and in the thread pool for a server.
    """
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
    finally:
        if engine.dialect.name == "sqlite":
            session.close()
        else:
            await anyio.to_thread.run_sync(session.close)


SessionDep = Annotated[Session, Depends(get_session)]
TokenDep = Annotated[str | None, Depends(oauth2)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's subject and role (checked against the user table)."""

    username: str
    role: str


class UserCache:
    """What the user table said about each username (role, enabled), for `seconds`: one API process
    checks a token's user at most that often. Disabling a user or changing a role takes effect in every
    process within `seconds` (0 disables the cache). Bounded: cleared when it holds `size` names."""

    def __init__(self, seconds: float, size: int = 10_000) -> None:
        self.seconds, self.size = seconds, size
        self._entries: dict[str, tuple[float, str | None]] = {}

    def get(self, username: str) -> tuple[bool, str | None]:
        """(known, role): role None for a user that is missing or disabled."""
        hit = self._entries.get(username)
        if hit is None or hit[0] < time.monotonic():
            return False, None
        return True, hit[1]

    def confirms(self, username: str, role: str) -> bool:
        """Whether this cache, without asking the database, holds `username` as an enabled user with `role`."""
        known, cached = self.get(username)
        return known and cached is not None and cached == role

    def put(self, username: str, role: str | None) -> None:
        """Remember the user's role (None: missing or disabled)."""
        if self.seconds <= 0:
            return
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[username] = (time.monotonic() + self.seconds, role)


def _user_role(session: Session, username: str) -> str | None:
    """The role of an enabled user called `username`; None when missing or disabled."""
    user = session.exec(select(User).where(User.username == username)).first()
    return None if user is None or user.disabled else user.role.value


async def get_current_user(request: Request, session: SessionDep, settings: SettingsDep, token: TokenDep) -> Principal:
    """The caller of a valid access token whose user still exists, is enabled and has that role; 401 otherwise.

    The signature and expiry are verified on every request; the user table is read at most once per
    `user_cache_seconds` per user and process (see UserCache).
    """
    if not token:
        raise unauthorized("missing bearer token; get one from POST /api/v1/auth/token")
    try:
        claims = decode_token(token, settings=settings, type=ACCESS)
    except TokenError as exc:
        raise unauthorized(str(exc)) from None
    cache: UserCache | None = getattr(request.app.state, "users", None)
    known, role = cache.get(claims.subject) if cache is not None else (False, None)
    if not known:
        role = await anyio.to_thread.run_sync(_user_role, session, claims.subject)
        if cache is not None:
            cache.put(claims.subject, role)
    if role is None or role != claims.role:
        raise unauthorized("the token's user no longer exists, is disabled or changed role; log in again")
    request.state.actor, request.state.role = claims.subject, role
    return Principal(claims.subject, role)


CurrentUser = Annotated[Principal, Depends(get_current_user)]


def require_role(*roles: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that lets only `roles` through (403 for any other authenticated role)."""
    return role_gate(get_current_user, roles)


AdminUser = Annotated[Principal, Depends(require_role("admin"))]
SponsorUser = Annotated[Principal, Depends(require_role("sponsor", "admin"))]
AuditorUser = Annotated[Principal, Depends(require_role("auditor", "admin"))]
ReaderUser = Annotated[Principal, Depends(require_role("sponsor", "auditor", "admin"))]


RequestId = Annotated[str, Depends(request_id)]
# Ids in paths stay within the 32-bit integer columns: a larger number is a 422, not a database overflow.
IdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="a record id")]
