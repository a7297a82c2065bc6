"""Dependencies of the API routes, as Annotated aliases; access checks are dependencies too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import OAuth2PasswordBearer
from sqlmodel import Session, select

from ..models import MAX_ID, User
from ..security import ACCESS, TokenError, decode_token
from ..settings import CoordinatorSettings

oauth2 = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)


def get_app_settings(request: Request) -> CoordinatorSettings:
    """The settings the app was created with (override with app.dependency_overrides in tests)."""
    return request.app.state.settings


SettingsDep = Annotated[CoordinatorSettings, Depends(get_app_settings)]


def get_engine(request: Request) -> sa.Engine:
    """The app's database engine."""
    return request.app.state.engine


EngineDep = Annotated[sa.Engine, Depends(get_engine)]


def get_session(engine: EngineDep) -> Iterator[Session]:
    """A database session for one request; routes commit what they change."""
    with Session(engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
TokenDep = Annotated[str | None, Depends(oauth2)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's subject and role (checked against the user table)."""

    username: str
    role: str


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


def get_current_user(request: Request, session: SessionDep, settings: SettingsDep, token: TokenDep) -> Principal:
    """The caller of a valid access token whose user still exists, is enabled and has that role; 401 otherwise."""
    if not token:
        raise _unauthorized("missing bearer token; get one from POST /api/v1/auth/token")
    try:
        claims = decode_token(token, settings=settings, type=ACCESS)
    except TokenError as exc:
        raise _unauthorized(str(exc)) from None
    user = session.exec(select(User).where(User.username == claims.subject)).first()
    if user is None or user.disabled or user.role.value != claims.role:
        raise _unauthorized("the token's user no longer exists, is disabled or changed role; log in again")
    request.state.actor, request.state.role = user.username, user.role.value
    return Principal(user.username, user.role.value)


CurrentUser = Annotated[Principal, Depends(get_current_user)]


def require_role(*roles: str) -> Callable[[Principal], Principal]:
    """A dependency that lets only `roles` through (403 for any other authenticated role)."""
    def check(user: CurrentUser) -> Principal:
        if user.role not in roles:
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"role {user.role!r} may not do this; it needs one of: {', '.join(roles)}")
        return user

    return check


AdminUser = Annotated[Principal, Depends(require_role("admin"))]
SponsorUser = Annotated[Principal, Depends(require_role("sponsor", "admin"))]
AuditorUser = Annotated[Principal, Depends(require_role("auditor", "admin"))]
ReaderUser = Annotated[Principal, Depends(require_role("sponsor", "auditor", "admin"))]


def request_id(request: Request) -> str:
    """The id of this request (set by the service middleware; echoed in X-Request-ID)."""
    return getattr(request.state, "request_id", "")


RequestId = Annotated[str, Depends(request_id)]
# Ids in paths stay within the 32-bit integer columns: a larger number is a 422, not a database overflow.
IdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="a record id")]
