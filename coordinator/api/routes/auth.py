"""Log in (username and password, as a form or JSON) and refresh tokens (rotation)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlmodel import Session

from evoclone.federated.api_deps import form_or_json_body, read_form_or_json

from ...audit import append_event
from ...errors import AuthenticationFailed
from ...models import TokenPair, User, UserPublic
from ...security import ACCESS, REFRESH, TokenError, create_token, decode_token
from ...settings import CoordinatorSettings
from ...users import authenticate, get_user, remember_refresh, use_refresh
from ..deps import CurrentUser, RequestId, SessionDep, SettingsDep

router = APIRouter(prefix="/auth", tags=["auth"])


class LoginRequest(BaseModel):
    """Credentials sent as JSON."""

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


class RefreshRequest(BaseModel):
    """A refresh token to exchange (it can be used once)."""

    refresh_token: str = Field(min_length=1, max_length=4096)


def _pair(session: Session, settings: CoordinatorSettings, user: User) -> TokenPair:
    access, _ = create_token(settings=settings, subject=user.username, role=user.role.value, type=ACCESS)
    refresh, claims = create_token(settings=settings, subject=user.username, role=user.role.value, type=REFRESH)
    remember_refresh(session=session, claims=claims)
    return TokenPair(access_token=access, refresh_token=refresh, expires_in=settings.access_token_minutes * 60)


LOGIN_BODY = form_or_json_body(LoginRequest, ("application/x-www-form-urlencoded", "application/json"))


async def _credentials(request: Request) -> LoginRequest:
    return await read_form_or_json(
        request, LoginRequest,
        invalid="send username and password (1 to 64 and 1 to 256 characters) as a form or a JSON object",
        unsupported="send the credentials as application/x-www-form-urlencoded or application/json")


@router.post("/token", response_model=TokenPair, openapi_extra=LOGIN_BODY,
             responses={401: {"description": "wrong username or password"}})
async def login(request: Request, session: SessionDep, settings: SettingsDep, rid: RequestId) -> TokenPair:
    """Exchange a username and password for an access token and a refresh token."""
    creds = await _credentials(request)

    def work() -> TokenPair:
        try:
            user = authenticate(session=session, username=creds.username, password=creds.password)
        except AuthenticationFailed:
            append_event(session=session, action="auth.login", outcome="denied", actor=creds.username[:64],
                         request_id=rid)
            session.commit()
            raise
        request.state.actor, request.state.role = user.username, user.role.value
        pair = _pair(session, settings, user)
        append_event(session=session, action="auth.login", outcome="ok", actor=user.username,
                     role=user.role.value, request_id=rid)
        session.commit()
        return pair

    return await run_in_threadpool(work)


@router.post("/refresh", response_model=TokenPair, responses={401: {"description": "unusable refresh token"}})
def refresh(body: RefreshRequest, session: SessionDep, settings: SettingsDep, rid: RequestId) -> TokenPair:
    """Exchange a refresh token for a new pair; the old refresh token stops working (a reuse ends all sessions)."""
    try:
        claims = decode_token(body.refresh_token, settings=settings, type=REFRESH)
    except TokenError as exc:
        raise AuthenticationFailed(str(exc)) from None
    user = use_refresh(session=session, claims=claims)
    pair = _pair(session, settings, user)
    append_event(session=session, action="auth.refresh", outcome="ok", actor=user.username, role=user.role.value,
                 request_id=rid)
    session.commit()
    return pair


@router.get("/me", response_model=UserPublic)
def me(user: CurrentUser, session: SessionDep) -> User:
    """The caller's own account."""
    return get_user(session=session, username=user.username)
