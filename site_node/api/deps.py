"""Dependencies of the site API's routes, as Annotated aliases; access checks are dependencies too.

Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency on the threadpool,
and a hop there and back per dependency was a large part of a cached request's time under load.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Annotated, NoReturn, TypeVar

import sqlalchemy as sa
from fastapi import Depends, Header, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session, select

from evoclone.federated.api_deps import app_engine, app_settings, request_id, role_gate, unauthorized
from evoclone.federated.stores.data_version import Memo
from evoclone.privacy.passwords import api_token_hash

from ..access_log import AccessLogWriter
from ..api_tokens import authenticate_token, is_api_token
from ..auth import decode_access_token
from ..auth_models import Role, SiteUser
from ..errors import AuthenticationFailed
from ..patients import PSEUDONYM_PATTERN
from ..sessions import SessionBackend, get_session as get_site_session
from ..settings import SiteSettings

T = TypeVar("T")
bearer = HTTPBearer(auto_error=False, description="an access token from POST /api/v1/auth/login, or a service "
                                                  "account's API token (evs_site_...)")


SettingsDep = Annotated[SiteSettings, Depends(app_settings)]
EngineDep = Annotated[sa.Engine, Depends(app_engine)]  # the site's transactional store


async def get_session(engine: EngineDep) -> AsyncIterator[Session]:
    """A database session for one request; routes commit what they change."""
    session = Session(engine, expire_on_commit=False)  # connects at its first query, on the caller's thread
    try:
        yield session
    finally:
        # closing a session that holds a connection rolls it back: database I/O, off the event loop
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_store(request: Request) -> SessionBackend:
    """The server-side session store (Redis or in-process)."""
    return request.app.state.sessions


StoreDep = Annotated[SessionBackend, Depends(get_store)]


async def get_now(request: Request) -> datetime:
    """The service clock's now (tests move the app's clock instead of sleeping)."""
    return request.app.state.clock()


NowDep = Annotated[datetime, Depends(get_now)]


async def get_access_log(request: Request) -> AccessLogWriter:
    """The app's access-log writer (group commit; see access_log.AccessLogWriter)."""
    return request.app.state.access_log


AccessLogDep = Annotated[AccessLogWriter, Depends(get_access_log)]
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user's name (or `service:<name>` for an API token), the role, and the session id."""

    name: str
    role: str
    sid: str | None = None  # None for API tokens (no session)

    @property
    def is_service(self) -> bool:
        """Whether the caller is a service account's API token."""
        return self.sid is None


class _NeedsIO(Exception):
    """The answer needs a database or Redis read: compute it off the event loop."""


def _needs_io() -> NoReturn:
    raise _NeedsIO


def _remember(memo: Memo | None, key: Hashable, compute: Callable[[], T], *, io: bool) -> T:
    """What `memo` keeps for `key`, else `compute()` (kept); with `io` False, _NeedsIO instead of computing."""
    if memo is None:
        return compute() if io else _needs_io()
    return memo.value(key, compute if io else _needs_io)


async def remembered(request: Request, key: Hashable, compute: Callable[[], T]) -> T:
    """`compute()` (blocking: run off the event loop), or what this process kept for `key`: a value read from the
    users, API tokens or model versions, kept while no process of the site has written those tables since and for
    at most `request_memo_seconds` (site_node/db.py); an exception is raised, never kept."""
    memo: Memo | None = request.app.state.memo
    try:
        return _remember(memo, key, compute, io=False)
    except _NeedsIO:
        return await run_in_threadpool(_remember, memo, key, compute, io=True)


def _token_owner(engine: sa.Engine, token: str) -> Principal:
    with Session(engine) as session:
        row = authenticate_token(session=session, token=token)
        return Principal(f"service:{row.name}", row.role)


def _user_state(engine: sa.Engine, username: str) -> tuple[bool, str] | None:
    """(disabled, role) of `username`, None when there is no such user."""
    with Session(engine) as session:
        user = session.exec(select(SiteUser).where(SiteUser.username == username)).first()
        return None if user is None else (user.disabled, user.role)


def authenticate_bearer(request: Request, engine: sa.Engine, settings: SiteSettings, store: SessionBackend,
                        now: datetime, token: str, *, io: bool = True) -> Principal:
    """The caller of a live session's access token, or of a live API token; AuthenticationFailed otherwise.

    Blocking (database, Redis) unless `io` is False: then it answers only from the request memo and an
    in-process session store, and raises _NeedsIO where it would have to read more. The token's owner (API
    token) and the user's state (session token) come from the request memo; the session itself is read from its
    store on every request, so a logout or a revocation holds at once."""
    memo: Memo | None = request.app.state.memo
    if is_api_token(token):
        principal = _remember(memo, ("api token", api_token_hash(token)), lambda: _token_owner(engine, token), io=io)
    else:
        claims = decode_access_token(token, secret=request.app.state.jwt_secret, now=now)
        if store.blocking and not io:
            raise _NeedsIO
        live = get_site_session(store=store, sid=claims.sid, now=now, idle_seconds=settings.session_idle_minutes * 60,
                                max_seconds=settings.session_max_hours * 3600)
        if live is None or live.username != claims.subject:
            raise AuthenticationFailed("the session has ended (logout, revocation or expiry); log in again at "
                                       "/api/v1/auth/login")
        state = _remember(memo, ("user", claims.subject), lambda: _user_state(engine, claims.subject), io=io)
        if state is None or state[0] or state[1] != claims.role:
            raise AuthenticationFailed("the token's user no longer exists, is disabled or changed role; log in again")
        principal = Principal(claims.subject, claims.role, claims.sid)
    request.state.actor, request.state.role = principal.name, principal.role
    return principal


async def get_current_user(request: Request, engine: EngineDep, settings: SettingsDep, store: StoreDep, now: NowDep,
                           creds: BearerDep) -> Principal:
    """The caller (authenticate_bearer): on the event loop when the request memo and the session store can
    answer, in the thread pool when it needs the database or Redis; 401 otherwise."""
    if creds is None or not creds.credentials:
        raise unauthorized("missing bearer token; log in at POST /api/v1/auth/login")
    args = (request, engine, settings, store, now, creds.credentials)
    try:
        return authenticate_bearer(*args, io=False)
    except _NeedsIO:
        return await run_in_threadpool(authenticate_bearer, *args)


CurrentUser = Annotated[Principal, Depends(get_current_user)]


def require_role(*roles: Role) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that lets only `roles` through (403 for any other authenticated role)."""
    return role_gate(get_current_user, sorted({Role(r).value for r in roles}))


ClinicalUser = Annotated[Principal, Depends(require_role(Role.clinician, Role.site_admin))]
AdminUser = Annotated[Principal, Depends(require_role(Role.site_admin))]
AuditorUser = Annotated[Principal, Depends(require_role(Role.auditor, Role.site_admin))]


RequestId = Annotated[str, Depends(request_id)]


class AccessReason(str, Enum):
    """Why patient-level data is read or written (a controlled list: free text could carry identifiers)."""

    treatment = "treatment"
    review = "review"
    quality_assurance = "quality_assurance"
    research = "research"
    safety = "safety"


REASONS = ", ".join(r.value for r in AccessReason)


async def access_reason(reason: Annotated[AccessReason | None, Query(description="why the data is accessed "
                                                                                  "(recorded in the access log)")
                                         ] = None,
                        x_access_reason: Annotated[AccessReason | None,
                                                   Header(description="the same as ?reason=")] = None,
                        ) -> AccessReason:
    """The required reason for patient-level access, from ?reason= or the X-Access-Reason header."""
    given = reason or x_access_reason
    if given is None:
        raise HTTPException(422, f"a reason is required to access patient data: add ?reason= or an "
                                 f"X-Access-Reason header, one of: {REASONS}")
    return given


ReasonDep = Annotated[AccessReason, Depends(access_reason)]
PseudonymPath = Annotated[str, Path(pattern=PSEUDONYM_PATTERN, description="the site pseudonym (P-<32 hex>)")]


# ids are database integers: a larger one is a 422, never an overflow in the driver (a 500)
RowId = Annotated[int, Path(ge=1, le=2**31 - 1, description="a row id")]
