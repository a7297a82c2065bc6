"""Users of the site API (site admins): list, add (TOTP enrolment shown once), change, end sessions, unlock."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from ... import auth as accounts
from ...auth_models import NAME_PATTERN, SiteUser, UserCreate, UserCreated, UserPublic, UserUpdate
from ...sessions import end_user_sessions
from ..deps import AdminUser, SessionDep, SettingsDep, StoreDep

router = APIRouter(prefix="/users", tags=["users"])
log = logging.getLogger("evoclone.site.api")
UsernamePath = Annotated[str, Path(pattern=NAME_PATTERN, max_length=64, description="a username")]


class SessionsEnded(BaseModel):
    """How many sessions a revocation ended."""

    ended: int


class Unlocked(BaseModel):
    """Whether the account was locked before."""

    was_locked: bool


@router.get("", response_model=list[UserPublic])
def list_users(admin: AdminUser, session: SessionDep) -> list[SiteUser]:
    """Every user of this site's API."""
    return accounts.list_users(session=session)


@router.post("", response_model=UserCreated, status_code=201)
async def add_user(data: UserCreate, admin: AdminUser, session: SessionDep, settings: SettingsDep,
                   request: Request) -> UserCreated:
    """Add a user; the answer holds the TOTP secret and otpauth:// URI, shown this once only."""
    def work() -> UserCreated:
        user, secret = accounts.create_user(session=session, data=data, totp_key=request.app.state.totp_key)
        session.commit()
        log.info("user %s (%s) added by %s", user.username, user.role, admin.name)
        return UserCreated(**UserPublic.model_validate(user, from_attributes=True).model_dump(), totp_secret=secret,
                           totp_uri=accounts.provisioning_uri(secret, username=user.username, site=settings.name))

    return await run_in_threadpool(work)  # argon2 hashing would block the event loop


@router.patch("/{username}", response_model=UserPublic)
def update_user(username: UsernamePath, data: UserUpdate, admin: AdminUser, session: SessionDep,
                store: StoreDep) -> SiteUser:
    """Change a user's role or disable it; either ends the user's sessions at once."""
    user, ends = accounts.update_user(session=session, username=username, data=data)
    session.commit()
    if ends:
        end_user_sessions(store=store, username=user.username)
    log.info("user %s changed by %s (role %s, disabled %s)", user.username, admin.name, user.role, user.disabled)
    return user


@router.delete("/{username}/sessions", response_model=SessionsEnded)
def end_sessions(username: UsernamePath, admin: AdminUser, session: SessionDep, store: StoreDep) -> SessionsEnded:
    """Revoke every session of a user: their tokens stop working at once (they can log in again)."""
    user = accounts.get_user(session=session, username=username)
    n = end_user_sessions(store=store, username=user.username)
    log.info("%d sessions of user %s ended by %s", n, user.username, admin.name)
    return SessionsEnded(ended=n)


@router.post("/{username}/unlock", response_model=Unlocked)
def unlock(username: UsernamePath, admin: AdminUser, session: SessionDep, store: StoreDep) -> Unlocked:
    """Lift a lockout after failed logins before it runs out."""
    user = accounts.get_user(session=session, username=username)
    return Unlocked(was_locked=accounts.unlock(store=store, username=user.username))
