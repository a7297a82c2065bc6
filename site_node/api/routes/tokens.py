"""API tokens of service accounts (site admins): issue (shown once), list, revoke."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path

from ... import api_tokens
from ...auth_models import ApiToken, ApiTokenCreate, ApiTokenIssued, ApiTokenPublic
from ..deps import AdminUser, NowDep, SessionDep

router = APIRouter(prefix="/tokens", tags=["tokens"])
log = logging.getLogger("evoclone.site.api")
TokenId = Annotated[int, Path(ge=1, le=2**31 - 1, description="a token id")]


@router.post("", response_model=ApiTokenIssued, status_code=201)
def issue(data: ApiTokenCreate, admin: AdminUser, session: SessionDep) -> ApiTokenIssued:
    """Issue a token for a service account with a role; the token is in this answer only."""
    row, token = api_tokens.issue_token(session=session, data=data, created_by=admin.name)
    session.commit()
    log.info("API token %d (%s, %s) issued by %s", row.id, row.name, row.role, admin.name)
    return ApiTokenIssued(**ApiTokenPublic.model_validate(row, from_attributes=True).model_dump(), token=token)


@router.get("", response_model=list[ApiTokenPublic])
def list_tokens(admin: AdminUser, session: SessionDep) -> list[ApiToken]:
    """Every token (never the token itself)."""
    return api_tokens.list_tokens(session=session)


@router.delete("/{token_id}", response_model=ApiTokenPublic)
def revoke(token_id: TokenId, admin: AdminUser, session: SessionDep, now: NowDep) -> ApiToken:
    """Revoke a token: it stops working at once."""
    row = api_tokens.revoke_token(session=session, token_id=token_id, now=now)
    session.commit()
    log.info("API token %d revoked by %s", row.id, admin.name)
    return row
