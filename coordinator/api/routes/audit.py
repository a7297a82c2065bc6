"""The audit trail: read it and verify its hash chain (auditors and admins)."""

from __future__ import annotations

from fastapi import APIRouter, Query
from pydantic import BaseModel

from ... import audit as trail
from ...models import AuditEvent, AuditEventPublic
from ..deps import AuditorUser, SessionDep

router = APIRouter(prefix="/audit", tags=["audit"])


class ChainStatus(BaseModel):
    """Whether the stored chain verifies, how many entries were checked and the first problem."""

    ok: bool
    checked: int
    problem: str
    seq: int | None


@router.get("/events", response_model=list[AuditEventPublic])
def events(user: AuditorUser, session: SessionDep, after: int = Query(0, ge=0, le=2**62),
           limit: int = Query(100, ge=1, le=1000)) -> list[AuditEvent]:
    """Audit events after a sequence number, oldest first."""
    return trail.list_events(session=session, after=after, limit=limit)


@router.get("/verify", response_model=ChainStatus)
def verify(user: AuditorUser, session: SessionDep) -> ChainStatus:
    """Verify the whole hash chain."""
    r = trail.verify_stored_chain(session=session)
    return ChainStatus(ok=r.ok, checked=r.checked, problem=r.problem, seq=r.seq)
