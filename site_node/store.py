"""The site's transactional store (SQLModel on SQLite by default): anonymized patients only."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from sqlalchemy import func
from sqlmodel import Field, Session, SQLModel, create_engine, select

from evoclone.federated.record import PatientRecord


class PatientBase(SQLModel):
    """Columns shared by the table and its public view."""

    site: str = Field(index=True)
    n_events: int = 0


class PatientRow(PatientBase, table=True):
    """One anonymized canonical record, keyed by its pseudonym."""

    __tablename__ = "patient"

    pseudonym: str = Field(primary_key=True)
    record_json: str
    content_hash: str = Field(index=True)


class SiteStore:
    """Keyword-only data access over one site's database."""

    def __init__(self, *, url: str) -> None:
        self.engine = create_engine(url)
        SQLModel.metadata.create_all(self.engine, tables=[PatientRow.__table__])

    def upsert_records(self, *, records: Iterable[PatientRecord]) -> int:
        """Insert or update records in one transaction (all or nothing); returns rows written."""
        written = 0
        with Session(self.engine) as session, session.begin():
            for r in records:
                payload = r.model_dump_json()
                digest = hashlib.sha256(payload.encode()).hexdigest()
                row = session.get(PatientRow, r.patient_id)
                if row is not None and row.content_hash == digest:
                    continue
                if row is None:
                    row = PatientRow(pseudonym=r.patient_id, site=r.site, n_events=len(r.events),
                                     record_json=payload, content_hash=digest)
                else:
                    row.record_json, row.content_hash, row.n_events = payload, digest, len(r.events)
                session.add(row)
                written += 1
        return written

    def records(self) -> list[PatientRecord]:
        """All records, ordered by pseudonym (stable across runs)."""
        with Session(self.engine) as session:
            rows = session.exec(select(PatientRow).order_by(PatientRow.pseudonym)).all()
            return [PatientRecord.model_validate_json(r.record_json) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of patients and timeline events stored."""
        with Session(self.engine) as session:
            patients = session.exec(select(func.count()).select_from(PatientRow)).one()
            events = session.exec(select(func.coalesce(func.sum(PatientRow.n_events), 0))).one()
        return {"patients": int(patients), "events": int(events)}

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()
