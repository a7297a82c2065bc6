"""Log in (password + TOTP code), refresh the access token within the session, log out, and who am I."""

from __future__ import annotations

import logging
from datetime import timedelta

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlmodel import select

from evoclone.federated.api_deps import form_or_json_body, read_form_or_json

from ...auth import authenticate, check_rate, create_access_token
from ...auth_models import SiteUser
from ...errors import AuthenticationFailed, TooManyAttempts
from ...sessions import create_session, end_session, rotate_refresh
from ..deps import CurrentUser, NowDep, SessionDep, SettingsDep, StoreDep

router = APIRouter(prefix="/auth", tags=["auth"])
log = logging.getLogger("evoclone.site.api")


class LoginRequest(BaseModel):
    """Credentials: username, password and the current code of the user's authenticator app."""

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)
    totp_code: str = Field(min_length=6, max_length=10, pattern=r"^\s*\d{6,8}\s*$")


class RefreshRequest(BaseModel):
    """The session's current refresh token (each works once)."""

    refresh_token: str = Field(min_length=1, max_length=512)


class TokenPair(BaseModel):
    """A short-lived access token bound to a server-side session, and the session's refresh token."""

    access_token: str
    token_type: str = "bearer"
    expires_in: int
    refresh_token: str
    role: str


class MePublic(BaseModel):
    """The caller: a user or a service account's API token."""

    name: str
    role: str
    service_account: bool


LOGIN_BODY = form_or_json_body(LoginRequest, ("application/json", "application/x-www-form-urlencoded"))


async def _credentials(request: Request) -> LoginRequest:
    return await read_form_or_json(
        request, LoginRequest,
        invalid="send username, password and totp_code (the 6-digit code of your authenticator app) as a JSON "
                "object or a form",
        unsupported="send the credentials as application/json or application/x-www-form-urlencoded")


def _pair(request: Request, settings, *, sid: str, username: str, role: str, refresh: str, now) -> TokenPair:
    access, _ = create_access_token(secret=request.app.state.jwt_secret, subject=username, role=role, sid=sid,
                                    now=now, minutes=settings.access_token_minutes)
    request.state.actor, request.state.role = username, role
    return TokenPair(access_token=access, expires_in=settings.access_token_minutes * 60, refresh_token=refresh,
                     role=role)


@router.post("/login", response_model=TokenPair, openapi_extra=LOGIN_BODY,
             responses={401: {"description": "wrong username, password or code"},
                        429: {"description": "too many attempts from this address, or the account is locked"},
                        503: {"description": "the session store is unavailable"}})
async def login(request: Request, session: SessionDep, settings: SettingsDep, store: StoreDep,
                now: NowDep) -> TokenPair:
    """Exchange username, password and TOTP code for an access token (minutes) and a refresh token (the session)."""
    creds = await _credentials(request)
    client = request.client.host if request.client else "unknown"
    metrics = request.app.state.metrics

    def work() -> TokenPair:
        try:
            check_rate(store=store, client=client, now=now, per_minute=settings.login_rate_per_minute)
        except TooManyAttempts:
            metrics.logins.labels("rate_limited").inc()
            raise
        try:
            user = authenticate(session=session, store=store, username=creds.username, password=creds.password,
                                code=creds.totp_code, key=request.app.state.totp_key, now=now,
                                max_failures=settings.login_max_failures,
                                lockout=timedelta(minutes=settings.lockout_minutes))
        except (AuthenticationFailed, TooManyAttempts) as exc:
            outcome = "denied" if isinstance(exc, AuthenticationFailed) else "locked"
            metrics.logins.labels(outcome).inc()
            log.info("login %s for user %r", outcome, creds.username[:64])
            raise
        s, refresh = create_session(store=store, username=user.username, role=user.role, now=now,
                                    max_seconds=settings.session_max_hours * 3600)
        metrics.logins.labels("ok").inc()
        return _pair(request, settings, sid=s.sid, username=user.username, role=user.role, refresh=refresh,
                     now=now)

    return await run_in_threadpool(work)


@router.post("/refresh", response_model=TokenPair, responses={401: {"description": "the session has ended"}})
def refresh(body: RefreshRequest, request: Request, session: SessionDep, settings: SettingsDep, store: StoreDep,
            now: NowDep) -> TokenPair:
    """A new access token and refresh token for the same session; the old refresh token stops working."""
    s, new_refresh = rotate_refresh(store=store, refresh_token=body.refresh_token, now=now,
                                    idle_seconds=settings.session_idle_minutes * 60,
                                    max_seconds=settings.session_max_hours * 3600)
    user = session.exec(select(SiteUser).where(SiteUser.username == s.username)).first()
    if user is None or user.disabled or user.role != s.role:
        end_session(store=store, sid=s.sid, username=s.username)
        raise AuthenticationFailed("the session's user no longer exists, is disabled or changed role; log in again")
    return _pair(request, settings, sid=s.sid, username=s.username, role=s.role, refresh=new_refresh, now=now)


@router.post("/logout", status_code=204, response_class=Response)
def logout(user: CurrentUser, store: StoreDep) -> Response:
    """End the caller's session at once: its access and refresh tokens stop working."""
    if user.sid is not None:
        end_session(store=store, sid=user.sid, username=user.name)
    return Response(status_code=204)


@router.get("/me", response_model=MePublic)
def me(user: CurrentUser) -> MePublic:
    """The caller's name and role."""
    return MePublic(name=user.name, role=user.role, service_account=user.is_service)
