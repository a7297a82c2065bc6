"""Site API tokens: an admin issues one per site; the site presents it as a Bearer token (role "site").

Tokens are 256-bit random strings, so a plain sha256 is enough to store them (no password hashing cost).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlmodel import Session, select

from evoclone.federated.stores.tokens import live_token, mark_revoked
from evoclone.privacy.passwords import new_api_token

from .errors import AuthenticationFailed, Conflict, NotFound
from .models import Site, SiteStatus
from .registry_models import SiteToken

PREFIX = "evs_"  # tells a site token from a JWT at a glance (and to the API's dependency)


def is_site_token(token: str | None) -> bool:
    """Whether a bearer token has the shape of a site token."""
    return bool(token) and token.startswith(PREFIX)


def issue_token(*, session: Session, site_id: int, created_by: str) -> tuple[SiteToken, Site, str]:
    """A new token for an active site: (row, site, the token itself, shown once)."""
    site = session.get(Site, site_id)
    if site is None:
        raise NotFound(f"site {site_id} does not exist; list sites with GET /api/v1/sites")
    if site.status != SiteStatus.active:
        raise Conflict(f"site {site.name!r} is {site.status.value}; only an active site gets an API token "
                       f"(accept it with POST /api/v1/sites/{site_id}/accept)")
    token, digest = new_api_token(PREFIX)
    row = SiteToken(site_id=site_id, token_hash=digest, hint=token[:10], created_by=created_by)
    session.add(row)
    session.flush()
    return row, site, token


def list_tokens(*, session: Session, site_id: int) -> list[SiteToken]:
    """A site's tokens, oldest first."""
    return list(session.exec(select(SiteToken).where(SiteToken.site_id == site_id).order_by(SiteToken.id)).all())


def revoke_token(*, session: Session, site_id: int, token_id: int) -> SiteToken:
    """Stop a token from working (revoking twice is a Conflict)."""
    row = session.get(SiteToken, token_id)
    if row is None or row.site_id != site_id:
        raise NotFound(f"site {site_id} has no token {token_id}; list them with GET /api/v1/sites/{site_id}/tokens")
    if row.revoked_at is not None:
        raise Conflict(f"token {token_id} of site {site_id} is already revoked")
    return mark_revoked(session=session, row=row, at=datetime.now(timezone.utc))


def authenticate_site(*, session: Session, token: str) -> Site:
    """The active site a token speaks for; AuthenticationFailed for an unknown, revoked or orphaned token."""
    row = live_token(session=session, table=SiteToken, token=token)
    if row is None:
        raise AuthenticationFailed("the site token is unknown or revoked; ask the coordinator admin for a new one "
                                   "(POST /api/v1/sites/{site_id}/tokens)")
    site = session.get(Site, row.site_id)
    if site is None or site.status != SiteStatus.active:
        raise AuthenticationFailed("the site of this token is no longer active; it must enrol again")
    return site
