"""Service-account API tokens of the site API: `evs_site_<random>`, stored as sha256, role-bound, revocable."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, select

from evoclone.federated.stores.tokens import live_token, mark_revoked
from evoclone.privacy.passwords import new_api_token

from .auth_models import ApiToken, ApiTokenCreate, Role
from .errors import AuthenticationFailed, Conflict, NotFound

PREFIX = "evs_site_"


def is_api_token(token: str | None) -> bool:
    """Whether a bearer token has the shape of a site API token (not a JWT)."""
    return bool(token) and token.startswith(PREFIX)


def issue_token(*, session: Session, data: ApiTokenCreate, created_by: str) -> tuple[ApiToken, str]:
    """A new token for a service account: (row, the token itself, shown once)."""
    token, digest = new_api_token(PREFIX)
    row = ApiToken(name=data.name, role=Role(data.role).value, token_hash=digest,
                   hint=token[:len(PREFIX) + 4], created_by=created_by[:128])
    session.add(row)
    session.flush()
    return row, token


def list_tokens(*, session: Session) -> list[ApiToken]:
    """Every token, oldest first."""
    return list(session.exec(select(ApiToken).order_by(ApiToken.id)).all())


def revoke_token(*, session: Session, token_id: int, now: datetime) -> ApiToken:
    """Stop a token from working at once (revoking twice is a Conflict)."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"API token {token_id} does not exist; list tokens with GET /api/v1/tokens")
    if row.revoked_at is not None:
        raise Conflict(f"API token {token_id} is already revoked")
    return mark_revoked(session=session, row=row, at=now)


def authenticate_token(*, session: Session, token: str) -> ApiToken:
    """The live token row for `token`; AuthenticationFailed for an unknown or revoked one."""
    row = live_token(session=session, table=ApiToken, token=token)
    if row is None:
        raise AuthenticationFailed("the API token is unknown or revoked; ask a site admin for a new one "
                                   "(POST /api/v1/tokens)")
    return row
