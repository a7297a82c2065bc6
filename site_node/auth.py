"""Site API accounts: users with argon2id passwords and a TOTP second factor, access tokens bound to a
server-side session, the per-username lockout and the per-address login rate limit.

Every function takes the time as `now` (the service's clock), so lockouts and expiry are tested by
moving a clock, never by sleeping.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import jwt
import pyotp
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from evoclone.privacy.envelope import open_sealed, seal
from evoclone.privacy.passwords import dummy_verify, hash_password, verify_password

from .auth_models import Role, SiteUser, UserCreate, UserUpdate
from .errors import AuthenticationFailed, Conflict, NotFound, TooManyAttempts
from .sessions import SessionBackend
from .settings import SiteSettings, load_key

ALGORITHM = "HS256"
ISSUER = "evoclone-site"
TOTP_ISSUER = "EvoClone site"
WRONG = "wrong username, password or one-time code"  # one message: a guesser learns nothing about which part


def totp_key(settings: SiteSettings) -> bytes:
    """The AES key that seals TOTP secrets at rest, derived from the site's secret key."""
    return hmac.new(load_key(settings), b"evoclone totp secret key", hashlib.sha256).digest()


def _seal_totp(secret: str, *, key: bytes, username: str) -> bytes:
    return seal(secret.encode(), data_key=key, context=b"totp\x1f" + username.encode())


def _open_totp(user: SiteUser, *, key: bytes) -> str:
    return open_sealed(user.totp_sealed, data_key=key, context=b"totp\x1f" + user.username.encode()).decode()


def provisioning_uri(secret: str, *, username: str, site: str) -> str:
    """The otpauth:// URI an authenticator app scans."""
    return pyotp.TOTP(secret).provisioning_uri(name=f"{username}@{site}", issuer_name=TOTP_ISSUER)


# --------------------------------------------------------------------------- users


def create_user(*, session: Session, data: UserCreate, totp_key: bytes) -> tuple[SiteUser, str]:
    """Add a user with an argon2id hash and a fresh TOTP secret; (user, the secret, shown once)."""
    if session.exec(select(SiteUser).where(SiteUser.username == data.username)).first() is not None:
        raise Conflict(f"user {data.username!r} already exists; choose another username")
    secret = pyotp.random_base32()
    user = SiteUser(username=data.username, role=Role(data.role).value, password_hash=hash_password(data.password),
                    totp_sealed=_seal_totp(secret, key=totp_key, username=data.username))
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"user {data.username!r} already exists; choose another username") from None
    return user, secret


def get_user(*, session: Session, username: str) -> SiteUser:
    """The user called `username`; NotFound otherwise."""
    user = session.exec(select(SiteUser).where(SiteUser.username == username)).first()
    if user is None:
        raise NotFound(f"user {username!r} does not exist; list users with GET /api/v1/users")
    return user


def list_users(*, session: Session) -> list[SiteUser]:
    """Every user, by name."""
    return list(session.exec(select(SiteUser).order_by(SiteUser.username)).all())


def update_user(*, session: Session, username: str, data: UserUpdate) -> tuple[SiteUser, bool]:
    """Change a user's role or disabled flag; (user, whether its sessions must end)."""
    user = get_user(session=session, username=username)
    ends = False
    if data.role is not None and Role(data.role).value != user.role:
        user.role, ends = Role(data.role).value, True
    if data.disabled is not None and data.disabled != user.disabled:
        user.disabled, ends = data.disabled, ends or data.disabled
    session.add(user)
    session.flush()
    return user, ends


# --------------------------------------------------------------------------- login limits


def _who(username: str) -> str:
    """The key part for a username: bounded length, and the same for names that do not exist."""
    return hashlib.sha256(username.encode()).hexdigest()[:32]


def check_rate(*, store: SessionBackend, client: str, now: datetime, per_minute: int) -> None:
    """Count one login attempt from `client`; TooManyAttempts beyond `per_minute` in this minute."""
    window = int(now.timestamp() // 60)
    n = store.incr(f"rate:{hashlib.sha256(client.encode()).hexdigest()[:32]}:{window}", ttl=120)
    if n > per_minute:
        retry = 60 - int(now.timestamp()) % 60
        raise TooManyAttempts(f"too many login attempts from this address; retry in {retry} s", retry_after=retry)


def check_lock(*, store: SessionBackend, username: str, now: datetime) -> None:
    """TooManyAttempts while `username` is locked; a lock that has run out is lifted."""
    raw = store.get(f"lock:{_who(username)}")
    if raw is None:
        return
    until = float(raw)
    if now.timestamp() >= until:
        store.delete(f"lock:{_who(username)}", f"fail:{_who(username)}")
        return
    minutes = max(1, round((until - now.timestamp()) / 60))
    raise TooManyAttempts(f"this account is locked after too many failed logins; retry in about {minutes} min or "
                          "ask a site admin to unlock it", retry_after=int(until - now.timestamp()) + 1)


def record_failure(*, store: SessionBackend, username: str, now: datetime, max_failures: int,
                   lockout: timedelta) -> bool:
    """Count a failed login of `username`; lock it at `max_failures` (True when this failure locked it)."""
    n = store.incr(f"fail:{_who(username)}", ttl=lockout.total_seconds())
    if n < max_failures:
        return False
    until = now.timestamp() + lockout.total_seconds()
    store.set(f"lock:{_who(username)}", repr(until).encode(), ttl=lockout.total_seconds() + 3600)
    store.delete(f"fail:{_who(username)}")
    return True


def unlock(*, store: SessionBackend, username: str) -> bool:
    """Lift a lock and forget failures (a site admin's decision); True when it was locked."""
    return store.delete(f"lock:{_who(username)}", f"fail:{_who(username)}") > 0


# --------------------------------------------------------------------------- login


def _totp_ok(user: SiteUser, code: str, *, key: bytes, store: SessionBackend, now: datetime) -> bool:
    """Whether `code` is this user's TOTP for now (one 30 s step either side), and not used before."""
    totp = pyotp.TOTP(_open_totp(user, key=key))
    code = code.strip()
    for offset in (0, -1, 1):
        step = int(now.timestamp() // totp.interval) + offset
        if hmac.compare_digest(totp.at(step * totp.interval), code):
            # a code works once: an observed code cannot be replayed within its window
            last = store.get(f"totp:{_who(user.username)}")
            if last is not None and int(last) >= step:
                return False
            store.set(f"totp:{_who(user.username)}", str(step).encode(), ttl=3 * totp.interval)
            return True
    return False


def authenticate(*, session: Session, store: SessionBackend, username: str, password: str, code: str,
                 key: bytes, now: datetime, max_failures: int, lockout: timedelta) -> SiteUser:
    """The enabled user whose password and TOTP code match; AuthenticationFailed (one message) otherwise."""
    # a locked username is refused before its password is checked, so a lock also stops password guessing
    check_lock(store=store, username=username, now=now)
    user = session.exec(select(SiteUser).where(SiteUser.username == username)).first()
    if user is None:
        dummy_verify(password)
    ok = user is not None and verify_password(password, user.password_hash) and not user.disabled \
        and _totp_ok(user, code, key=key, store=store, now=now)
    if not ok:
        if record_failure(store=store, username=username, now=now, max_failures=max_failures, lockout=lockout):
            raise TooManyAttempts(f"too many failed logins: this account is locked for {int(lockout.total_seconds() // 60)} min",
                                  retry_after=int(lockout.total_seconds()))
        raise AuthenticationFailed(WRONG)
    store.delete(f"fail:{_who(username)}")
    return user


# --------------------------------------------------------------------------- access tokens


@dataclass(frozen=True)
class AccessClaims:
    """What an access token says: who, which role, which server-side session, until when."""

    subject: str
    role: str
    sid: str
    expires_at: datetime


def create_access_token(*, secret: str, subject: str, role: str, sid: str, now: datetime,
                        minutes: int) -> tuple[str, AccessClaims]:
    """A signed (HS256) access token bound to session `sid`."""
    issued = now.astimezone(timezone.utc).replace(microsecond=0)
    claims = AccessClaims(subject=subject, role=role, sid=sid, expires_at=issued + timedelta(minutes=minutes))
    payload = {"sub": subject, "role": role, "sid": sid, "type": "access", "iss": ISSUER, "jti": uuid.uuid4().hex,
               "iat": int(issued.timestamp()), "exp": int(claims.expires_at.timestamp())}
    return jwt.encode(payload, secret, algorithm=ALGORITHM), claims


def decode_access_token(token: str, *, secret: str, now: datetime) -> AccessClaims:
    """Verify signature, issuer, type and expiry (against `now`); AuthenticationFailed with the reason."""
    try:
        payload = jwt.decode(token, secret, algorithms=[ALGORITHM], issuer=ISSUER,
                             options={"require": ["sub", "role", "sid", "type", "exp", "iss"],
                                      # times are checked against the service clock below
                                      "verify_exp": False, "verify_iat": False, "verify_nbf": False})
    except jwt.InvalidTokenError:
        raise AuthenticationFailed("the token is invalid (bad signature or format); log in again at "
                                   "/api/v1/auth/login") from None
    if payload.get("type") != "access":
        raise AuthenticationFailed("not an access token; send the access_token from /api/v1/auth/login")
    try:
        exp = int(payload["exp"])
    except (TypeError, ValueError):
        raise AuthenticationFailed("the token is invalid (bad expiry); log in again at /api/v1/auth/login") from None
    if now.timestamp() >= exp:
        raise AuthenticationFailed("the access token has expired; get a new one from /api/v1/auth/refresh")
    return AccessClaims(subject=str(payload["sub"]), role=str(payload["role"]), sid=str(payload["sid"]),
                        expires_at=datetime.fromtimestamp(exp, timezone.utc))
