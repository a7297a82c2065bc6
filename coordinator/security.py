"""Bearer tokens (JWT HS256: access and refresh, with role, exp, jti and type)."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache

import jwt

from .settings import CoordinatorSettings

ALGORITHM = "HS256"
ISSUER = "evoclone-coordinator"
ACCESS, REFRESH = "access", "refresh"


class TokenError(ValueError):
    """A bearer token is missing, malformed, forged, expired or of the wrong type."""


@dataclass(frozen=True)
class TokenClaims:
    """The claims the coordinator relies on."""

    subject: str
    role: str
    type: str
    jti: str
    expires_at: datetime


def create_token(*, settings: CoordinatorSettings, subject: str, role: str, type: str,
                 now: datetime | None = None, jti: str | None = None) -> tuple[str, TokenClaims]:
    """A signed token of `type` (access or refresh) for `subject` with `role`."""
    if type not in (ACCESS, REFRESH):
        raise ValueError(f"token type must be {ACCESS!r} or {REFRESH!r}, got {type!r}")
    issued = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    life = timedelta(minutes=settings.access_token_minutes) if type == ACCESS else \
        timedelta(days=settings.refresh_token_days)
    claims = TokenClaims(subject=subject, role=role, type=type, jti=jti or uuid.uuid4().hex, expires_at=issued + life)
    payload = {"sub": subject, "role": role, "type": type, "jti": claims.jti, "iss": ISSUER,
               "iat": int(issued.timestamp()), "exp": int(claims.expires_at.timestamp())}
    return jwt.encode(payload, settings.jwt_secret.get_secret_value(), algorithm=ALGORITHM), claims


@lru_cache(maxsize=4)
def _verification_key(secret: str) -> jwt.PyJWK:
    """The HS256 secret as a prepared key: PyJWT re-checks and re-derives a plain string key on every decode,
    which cost as much as the verification itself. The signature is still verified on every decode."""
    k = base64.urlsafe_b64encode(secret.encode()).rstrip(b"=").decode()
    return jwt.PyJWK({"kty": "oct", "k": k, "alg": ALGORITHM})


def decode_token(token: str, *, settings: CoordinatorSettings, type: str) -> TokenClaims:
    """Verify signature, expiry, issuer and type; TokenError with a one-line reason otherwise."""
    try:
        payload = jwt.decode(token, _verification_key(settings.jwt_secret.get_secret_value()), algorithms=[ALGORITHM],
                             issuer=ISSUER,
                             options={"require": ["sub", "role", "type", "jti", "exp", "iss"]})
    except jwt.ExpiredSignatureError:
        raise TokenError("the token has expired; get a new one from /api/v1/auth/refresh or /api/v1/auth/token") \
            from None
    except jwt.InvalidTokenError:
        raise TokenError("the token is invalid (bad signature or format); log in again at /api/v1/auth/token") \
            from None
    if payload.get("type") != type:
        raise TokenError(f"a {payload.get('type')!r} token was sent where a {type!r} token is required")
    return TokenClaims(subject=str(payload["sub"]), role=str(payload["role"]), type=type, jti=str(payload["jti"]),
                       expires_at=datetime.fromtimestamp(int(payload["exp"]), timezone.utc))
