"""Append-only, hash-chained audit trail: hash = sha256(prev_hash + canonical JSON of the entry).

An edited entry no longer matches its hash; a removed or reordered one breaks the next
entry's prev_hash or the seq sequence. Request bodies are never recorded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from evoclone.federated.stores.chain import rows_by_seq
from evoclone.privacy.hashchain import GENESIS, canonical_time, compute_hash

from .models import AuditEvent

_FIELDS = ("seq", "at", "prev_hash", "actor", "role", "action", "resource", "outcome", "detail", "request_id")
_LOCK_KEY = 0x45766F436C6F6E65  # "EvoClone": the PostgreSQL advisory lock that serialises appends


@dataclass(frozen=True)
class ChainReport:
    """Result of verifying a chain: ok, how many entries were checked, and the first problem."""

    ok: bool
    checked: int
    problem: str = ""
    seq: int | None = None


def entry_of(event: AuditEvent | dict[str, Any]) -> dict[str, Any]:
    """The hashed fields of an event, in canonical form."""
    get = event.get if isinstance(event, dict) else lambda k: getattr(event, k)
    entry = {k: get(k) for k in _FIELDS}
    entry["at"] = canonical_time(entry["at"])
    entry["detail"] = entry["detail"] or {}
    return entry


def _lock(session: Session) -> None:
    """Serialise appenders so two requests never compute the same seq."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    elif bind.dialect.name == "sqlite":  # a write statement takes SQLite's single writer lock up front
        session.execute(sa.text("DELETE FROM audit_event WHERE 0"))


def _head(session: Session) -> tuple[int, str]:
    """The chain's last (seq, hash), or (0, GENESIS) when empty."""
    row = session.execute(sa.select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)).first()
    return (row[0], row[1]) if row else (0, GENESIS)


def _entry(seq: int, prev_hash: str, *, action: str, outcome: str, actor: str = "", role: str = "",
           resource: str = "", detail: dict[str, Any] | None = None, request_id: str = "",
           at: datetime | None = None) -> dict[str, Any]:
    """The row at `seq` after `prev_hash`, with its hash."""
    when = (at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    row = {"seq": seq, "at": when, "prev_hash": prev_hash, "actor": actor[:128], "role": role[:32],
           "action": action[:128], "resource": resource[:512], "outcome": outcome[:64], "detail": dict(detail or {}),
           "request_id": request_id[:64]}
    row["hash"] = compute_hash(prev_hash, {**row, "at": canonical_time(when)})  # the fields entry_of() hashes
    return row


def append_event(*, session: Session, action: str, outcome: str, actor: str = "", role: str = "",
                 resource: str = "", detail: dict[str, Any] | None = None, request_id: str = "",
                 at: datetime | None = None) -> AuditEvent:
    """Add the next link to the chain in the caller's transaction (the caller commits)."""
    _lock(session)
    seq, prev_hash = _head(session)
    event = AuditEvent(**_entry(seq + 1, prev_hash, action=action, outcome=outcome, actor=actor, role=role,
                                resource=resource, detail=detail, request_id=request_id, at=at))
    session.add(event)
    session.flush()
    return event


def append_events(*, session: Session, events: list[dict[str, Any]]) -> int:
    """Add several links in order in the caller's transaction (one lock, one read of the head, one insert);
    each item holds append_event's keyword arguments. The seq of the last one."""
    _lock(session)
    seq, prev_hash = _head(session)
    rows = []
    for fields in events:
        seq += 1
        rows.append(_entry(seq, prev_hash, **fields))
        prev_hash = rows[-1]["hash"]
    if rows:
        session.execute(sa.insert(AuditEvent.__table__), rows)
    return seq


def verify_chain(events: Iterable[AuditEvent | dict[str, Any]], *, from_start: bool = True) -> ChainReport:
    """Check seq continuity (from 1 unless `from_start` is False), every prev_hash link and every hash."""
    prev_hash, expected_seq, n = GENESIS, (1 if from_start else None), 0
    for ev in events:
        entry = entry_of(ev)
        stored = ev["hash"] if isinstance(ev, dict) else ev.hash
        seq = entry["seq"]
        if expected_seq is None:
            expected_seq = seq
            prev_hash = entry["prev_hash"] if seq != 1 else GENESIS
        if seq != expected_seq:
            what = "missing or reordered" if seq > expected_seq else "reordered or duplicated"
            return ChainReport(False, n, f"audit entry {expected_seq} is {what} (found seq {seq} in its place)", seq)
        if entry["prev_hash"] != prev_hash:
            return ChainReport(False, n, f"audit entry {seq} does not link to entry {seq - 1} "
                                         "(an entry before it was removed, reordered or edited)", seq)
        if compute_hash(entry["prev_hash"], entry) != stored:
            return ChainReport(False, n, f"audit entry {seq} was modified after it was written (hash mismatch)", seq)
        prev_hash, expected_seq, n = stored, seq + 1, n + 1
    return ChainReport(True, n)


def verify_stored_chain(*, session: Session, batch: int = 1000) -> ChainReport:
    """Verify the whole stored chain in seq order, reading in batches."""
    return verify_chain(rows_by_seq(session=session, table=AuditEvent, batch=batch))


def list_events(*, session: Session, after: int = 0, limit: int = 100) -> list[AuditEvent]:
    """Events with seq > after, oldest first."""
    return list(session.exec(select(AuditEvent).where(AuditEvent.seq > after).order_by(AuditEvent.seq)
                             .limit(limit)).all())
