"""Read one stored (anonymized, encrypted) patient record by its site pseudonym."""

from __future__ import annotations

import sqlalchemy as sa
from pydantic import BaseModel
from sqlmodel import Session

from evoclone.federated.record import PatientRecord
from evoclone.privacy.envelope import WrappedKey, open_sealed, unwrap

from .errors import NotFound
from .keyring import Keyring
from .store import DataKeyRow, PatientBase, PatientRow

PSEUDONYM_PATTERN = r"^P-[0-9a-f]{32}$"
UNKNOWN = "no patient with that pseudonym at this site; check the pseudonym (site pseudonyms look like P-<32 hex>)"


class OutcomesPublic(BaseModel):
    """Trial endpoints of one patient (any may be missing)."""

    time_to_event: float | None = None
    event: bool | None = None
    binary: int | None = None
    continuous: float | None = None


class PatientSummaryPublic(PatientBase):
    """A patient as the site API shows it: anonymized baseline covariates, arm, events count and outcomes."""

    pseudonym: str
    arm: str | None
    baseline: dict[str, float | str | None]
    outcomes: OutcomesPublic


def get_record(*, engine: sa.Engine, keyring: Keyring, pseudonym: str) -> PatientRecord:
    """The decrypted, authenticated record of `pseudonym`; NotFound (never echoing it) otherwise."""
    with Session(engine) as session:
        row = session.get(PatientRow, pseudonym)
        if row is None:
            raise NotFound(UNKNOWN)
        k = session.get(DataKeyRow, row.data_key_id)
        data_key = unwrap(WrappedKey(k.master_id, k.nonce, k.wrapped), master_key=keyring.keys[k.master_id])
        payload = open_sealed(row.ciphertext, data_key=data_key, context=row.pseudonym.encode())
    return PatientRecord.model_validate_json(payload)


def summary(record: PatientRecord) -> PatientSummaryPublic:
    """The public summary of a record (no timeline, no notes, no dates)."""
    return PatientSummaryPublic(pseudonym=record.patient_id, site=record.site, n_events=len(record.events),
                                arm=record.arm.name.lower() if record.arm is not None else None,
                                baseline=dict(record.baseline),
                                outcomes=OutcomesPublic(**record.outcomes.model_dump()))
