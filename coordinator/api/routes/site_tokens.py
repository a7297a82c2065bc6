"""Site API tokens: the admin issues and revokes them; a site presents one as Bearer (role "site")."""

from __future__ import annotations

from fastapi import APIRouter, status

from ... import site_tokens as store
from ...audit import append_event
from ...registry_models import SiteToken, SiteTokenIssued, SiteTokenPublic
from ..deps import AdminUser, IdPath, RequestId, SessionDep

router = APIRouter(prefix="/sites", tags=["sites"])



@router.post("/{site_id}/tokens", response_model=SiteTokenIssued, status_code=status.HTTP_201_CREATED,
             responses={409: {"description": "the site is not active"}})
def issue(site_id: IdPath, user: AdminUser, session: SessionDep, rid: RequestId) -> SiteTokenIssued:
    """Issue an API token for an active site; it is shown only in this answer (store it in the site's secrets)."""
    row, site, token = store.issue_token(session=session, site_id=site_id, created_by=user.username)
    append_event(session=session, action="site.token.issue", outcome="ok", actor=user.username, role=user.role,
                 resource=f"site/{site_id}", detail={"token_id": row.id, "hint": row.hint}, request_id=rid)
    session.commit()
    return SiteTokenIssued.model_validate(row, update={"site": site.name, "token": token})


@router.get("/{site_id}/tokens", response_model=list[SiteTokenPublic])
def list_tokens(site_id: IdPath, user: AdminUser, session: SessionDep) -> list[SiteToken]:
    """A site's tokens (never the secrets)."""
    return store.list_tokens(session=session, site_id=site_id)


@router.post("/{site_id}/tokens/{token_id}/revoke", response_model=SiteTokenPublic,
             responses={404: {"description": "no such token"}, 409: {"description": "already revoked"}})
def revoke(site_id: IdPath, token_id: IdPath, user: AdminUser, session: SessionDep, rid: RequestId) -> SiteToken:
    """Stop a token from working."""
    row = store.revoke_token(session=session, site_id=site_id, token_id=token_id)
    append_event(session=session, action="site.token.revoke", outcome="ok", actor=user.username, role=user.role,
                 resource=f"site/{site_id}", detail={"token_id": row.id, "hint": row.hint}, request_id=rid)
    session.commit()
    return row
