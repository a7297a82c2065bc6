"""The access log (auditors and site admins): read entries, verify the hash chain and see its head."""

from __future__ import annotations

from fastapi import APIRouter, Query
from pydantic import BaseModel

from ... import access_log
from ...access_log import AccessEntry, AccessEntryPublic
from ...patients import PSEUDONYM_PATTERN
from ..deps import AuditorUser, EngineDep, SessionDep

router = APIRouter(prefix="/audit", tags=["audit"])


class ChainStatus(BaseModel):
    """Whether the stored chain verifies, the entries checked, the first problem and the verified head."""

    ok: bool
    entries: int
    problem: str | None
    first_bad_seq: int | None
    seq: int
    hash: str


@router.get("/access-log", response_model=list[AccessEntryPublic])
def entries(user: AuditorUser, session: SessionDep, after: int = Query(0, ge=0, le=2**62),
            limit: int = Query(100, ge=1, le=1000),
            pseudonym: str | None = Query(None, pattern=PSEUDONYM_PATTERN)) -> list[AccessEntry]:
    """Access-log entries after a sequence number, oldest first (optionally of one pseudonym)."""
    return access_log.list_entries(session=session, after=after, limit=limit, pseudonym=pseudonym)


@router.get("/verify", response_model=ChainStatus)
def verify(user: AuditorUser, engine: EngineDep) -> ChainStatus:
    """Verify the whole chain; the head is the last entry that verified."""
    return ChainStatus(**access_log.chain_head(engine))
