"""Patient-level data: every access names a reason and is appended to the hash-chained access log first."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...access_log import AccessEntryCreate, record_access
from ...errors import NotFound
from ...keyring import load_keyring
from ...patients import PatientSummaryPublic, get_record, summary
from ..deps import ClinicalUser, EngineDep, NowDep, PseudonymPath, ReasonDep, RequestId, SettingsDep

router = APIRouter(prefix="/patients", tags=["patients"])


@router.get("/{pseudonym}", response_model=PatientSummaryPublic,
            responses={404: {"description": "no such patient at this site"},
                       403: {"description": "auditors do not read patient data"}})
def read_patient(pseudonym: PseudonymPath, user: ClinicalUser, reason: ReasonDep, engine: EngineDep,
                 settings: SettingsDep, now: NowDep, rid: RequestId, request: Request) -> PatientSummaryPublic:
    """A patient's anonymized summary: baseline covariates, arm, number of events and outcomes."""
    entry = dict(actor=user.name, role=user.role, action="patient.read", reason=reason.value, request_id=rid)
    metrics = request.app.state.metrics
    # the keyring is read per request: a key rotation while serving must not break reads
    try:
        record = get_record(engine=engine, keyring=load_keyring(settings.site_dir), pseudonym=pseudonym)
    except NotFound:
        # the requested value may be anything a user typed: it is not recorded, only that nothing matched
        record_access(engine=engine, data=AccessEntryCreate(**entry, outcome="not_found"), at=now)
        metrics.access_entries.labels("patient.read", "not_found").inc()
        raise
    # logged before the data leaves: no unlogged read, even if the log write fails
    record_access(engine=engine, data=AccessEntryCreate(**entry, pseudonym=record.patient_id), at=now)
    metrics.access_entries.labels("patient.read", "ok").inc()
    return summary(record)
