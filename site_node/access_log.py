"""The site's access log: every read or write of patient-level data, hash-chained so that an edited,
removed or reordered entry is detected (`evoclone site audit verify`).

An entry names who (user or service account), their role, the action, the site pseudonym (never
a raw identifier; empty when the requested patient does not exist), why, and when.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlmodel import Column, Field, Session, SQLModel, select

from evoclone.privacy.hashchain import GENESIS, ChainReport, canonical_time, compute_hash, verify_chain

_FIELDS = ("seq", "at", "prev_hash", "actor", "role", "action", "pseudonym", "reason", "outcome", "request_id")
_LOCK_KEY = 0x45765369746541  # the PostgreSQL advisory lock that serialises appends ("EvSiteA")


class AccessEntryBase(SQLModel):
    """Who did what to which pseudonymized patient, why, and how it ended."""

    actor: str = Field(max_length=128)
    role: str = Field(max_length=32)
    action: str = Field(max_length=64)  # e.g. patient.read, twin.generate, review.write
    pseudonym: str = Field(default="", max_length=64, index=True)
    reason: str = Field(max_length=32)
    outcome: str = Field(default="ok", max_length=16)  # ok, not_found, denied
    request_id: str = Field(default="", max_length=64)


class AccessEntryCreate(AccessEntryBase):
    """An entry to append."""


class AccessEntry(AccessEntryBase, table=True):
    """One link of the chain: hash = sha256(prev_hash + canonical JSON of the entry)."""

    __tablename__ = "access_log"

    seq: int = Field(sa_column=Column(sa.BigInteger, primary_key=True, autoincrement=False))
    at: datetime = Field(sa_column=Column(sa.DateTime(timezone=True), nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64, sa_column_kwargs={"unique": True})


class AccessEntryPublic(AccessEntryBase):
    """An access-log entry as the API shows it."""

    seq: int
    at: datetime
    prev_hash: str
    hash: str


def entry_of(row: AccessEntry | dict[str, Any]) -> dict[str, Any]:
    """The hashed fields of an entry, in canonical form."""
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k)
    entry = {k: get(k) for k in _FIELDS}
    entry["at"] = canonical_time(entry["at"])
    return entry


def _lock(session: Session) -> None:
    """Serialise appenders so two requests never compute the same seq."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    elif dialect == "sqlite":  # a write statement takes SQLite's single writer lock up front
        session.execute(sa.text("DELETE FROM access_log WHERE 0"))


def append_access(*, session: Session, data: AccessEntryCreate, at: datetime | None = None) -> AccessEntry:
    """Add the next link in the caller's transaction (the caller commits, with the change it records)."""
    _lock(session)
    last = session.exec(select(AccessEntry).order_by(AccessEntry.seq.desc()).limit(1)).first()
    when = (at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    row = AccessEntry(**data.model_dump(), seq=(last.seq + 1) if last else 1, at=when,
                      prev_hash=last.hash if last else GENESIS, hash="")
    row.hash = compute_hash(row.prev_hash, entry_of(row))
    session.add(row)
    session.flush()
    return row


def record_access(*, engine: sa.Engine, data: AccessEntryCreate, at: datetime | None = None) -> AccessEntry:
    """Append one entry in its own transaction (for reads: committed before the data is returned)."""
    with Session(engine, expire_on_commit=False) as session:
        row = append_access(session=session, data=data, at=at)
        session.commit()
        return row


def _rows(session: Session, batch: int = 1000) -> Iterator[AccessEntry]:
    after = 0
    while True:
        chunk = session.exec(select(AccessEntry).where(AccessEntry.seq > after)
                             .order_by(AccessEntry.seq).limit(batch)).all()
        if not chunk:
            return
        yield from chunk
        after = chunk[-1].seq


def verify_log(*, engine: sa.Engine) -> ChainReport:
    """Verify the whole stored chain in seq order (read in batches)."""
    with Session(engine) as session:
        return verify_chain(((entry_of(r), r.hash) for r in _rows(session)), what="access-log entry")


def chain_head(engine: sa.Engine, *, verify: bool = True) -> dict[str, Any]:
    """The head for the compliance self-check: {seq, hash, entries, ok, problem, first_bad_seq} (see below)."""
    # verify (the default) reads the whole chain and reports the last entry that verified; without it the
    # stored last entry comes back unchecked (ok None), for callers that only record the head
    if verify:
        r = verify_log(engine=engine)
        return {"seq": r.head_seq, "hash": r.head_hash, "entries": r.checked, "ok": r.ok,
                "problem": r.problem or None, "first_bad_seq": r.seq}
    with Session(engine) as session:
        last = session.exec(select(AccessEntry).order_by(AccessEntry.seq.desc()).limit(1)).first()
    return {"seq": last.seq if last else 0, "hash": last.hash if last else GENESIS,
            "entries": last.seq if last else 0, "ok": None, "problem": None, "first_bad_seq": None}


def list_entries(*, session: Session, after: int = 0, limit: int = 100, pseudonym: str | None = None) -> list[AccessEntry]:
    """Entries with seq > after, oldest first (optionally of one pseudonym)."""
    q = select(AccessEntry).where(AccessEntry.seq > after)
    if pseudonym:
        q = q.where(AccessEntry.pseudonym == pseudonym)
    return list(session.exec(q.order_by(AccessEntry.seq).limit(limit)).all())
