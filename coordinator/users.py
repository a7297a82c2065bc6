"""Users of the coordinator's API: create, authenticate, and refresh-token bookkeeping."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from evoclone.privacy.passwords import dummy_verify, hash_password, verify_password

from .errors import AuthenticationFailed, Conflict, NotFound
from .models import RefreshToken, User, UserCreate
from .security import TokenClaims


def create_user(*, session: Session, data: UserCreate) -> User:
    """Add a user with an argon2id password hash; Conflict when the name is taken."""
    if session.exec(select(User).where(User.username == data.username)).first() is not None:
        raise Conflict(f"user {data.username!r} already exists; choose another username")
    user = User(username=data.username, role=data.role, password_hash=hash_password(data.password))
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"user {data.username!r} already exists; choose another username") from None
    return user


def get_user(*, session: Session, username: str) -> User:
    """The user called `username`; NotFound otherwise."""
    user = session.exec(select(User).where(User.username == username)).first()
    if user is None:
        raise NotFound(f"user {username!r} does not exist; add it with `evoclone coordinator user add`")
    return user


def authenticate(*, session: Session, username: str, password: str) -> User:
    """The enabled user whose password matches; AuthenticationFailed (same message) otherwise."""
    user = session.exec(select(User).where(User.username == username)).first()
    if user is None:
        dummy_verify(password)
    if user is None or not verify_password(password, user.password_hash) or user.disabled:
        raise AuthenticationFailed("wrong username or password")
    return user


def remember_refresh(*, session: Session, claims: TokenClaims) -> None:
    """Record an issued refresh token so it can be used exactly once."""
    session.add(RefreshToken(jti=claims.jti, username=claims.subject,
                             expires_at=claims.expires_at))


def use_refresh(*, session: Session, claims: TokenClaims) -> User:
    """Consume a refresh token (rotation); a reused one revokes every refresh token of its user."""
    row = session.get(RefreshToken, claims.jti, with_for_update=True)  # two refreshes at once: one wins
    if row is None or row.revoked:
        raise AuthenticationFailed("the refresh token is not valid; log in again at /api/v1/auth/token")
    if row.used_at is not None:
        for other in session.exec(select(RefreshToken).where(RefreshToken.username == row.username)).all():
            other.revoked = True
            session.add(other)
        session.commit()  # the revocation must stick although the request fails
        raise AuthenticationFailed("the refresh token was already used; every session of this user was ended, "
                                   "log in again at /api/v1/auth/token")
    row.used_at = datetime.now(timezone.utc)
    session.add(row)
    user = session.exec(select(User).where(User.username == claims.subject)).first()
    if user is None or user.disabled:
        raise AuthenticationFailed("the user of this refresh token no longer exists or is disabled")
    return user
