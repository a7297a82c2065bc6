"""The site's access log: every read or write of patient-level data, hash-chained so that an edited,
removed or reordered entry is detected (`evoclone site audit verify`).

An entry names who (user or service account), their role, the action, the site pseudonym (never
a raw identifier; empty when the requested patient does not exist), why, and when.

Under load, `AccessLogWriter` appends the entries of many concurrent requests in one transaction
(group commit): each request still waits until its entry is committed before it answers.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlmodel import Column, Field, Session, SQLModel, select

from evoclone.federated.stores.chain import rows_by_seq
from evoclone.federated.stores.group_commit import GroupCommitWriter
from evoclone.privacy.hashchain import GENESIS, ChainReport, canonical_time, compute_hash, verify_chain

_FIELDS = ("seq", "at", "prev_hash", "actor", "role", "action", "pseudonym", "reason", "outcome", "request_id")
_LOCK_KEY = 0x45765369746541  # the PostgreSQL advisory lock that serialises appends ("EvSiteA")
log = logging.getLogger("evoclone.site.access_log")


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


def append_many(*, session: Session, items: list[tuple[AccessEntryCreate, datetime | None]]) -> list[AccessEntry]:
    """Add several links, in order, in the caller's transaction (the caller commits, with the change they
    record): one lock, one read of the chain's head, one insert."""
    _lock(session)
    # Core statements on the table: the ORM's unit of work doubled the cost of an append, and every read of
    # patient data makes one
    table = AccessEntry.__table__
    last = session.execute(sa.select(table.c.seq, table.c.hash).order_by(table.c.seq.desc()).limit(1)).first()
    seq, prev_hash = (last[0], last[1]) if last else (0, GENESIS)
    rows = []
    for data, at in items:
        seq += 1
        values = {**data.model_dump(), "seq": seq, "at": (at or datetime.now(timezone.utc)).astimezone(timezone.utc),
                  "prev_hash": prev_hash}
        values["hash"] = prev_hash = compute_hash(prev_hash, entry_of(values))
        rows.append(values)
    if rows:
        session.execute(sa.insert(table), rows)
    return [AccessEntry(**values) for values in rows]


def append_access(*, session: Session, data: AccessEntryCreate, at: datetime | None = None) -> AccessEntry:
    """Add the next link in the caller's transaction (the caller commits, with the change it records)."""
    return append_many(session=session, items=[(data, at)])[0]


def record_access(*, engine: sa.Engine, data: AccessEntryCreate, at: datetime | None = None) -> AccessEntry:
    """Append one entry in its own transaction (for reads: committed before the data is returned)."""
    with Session(engine, expire_on_commit=False) as session:
        row = append_access(session=session, data=data, at=at)
        session.commit()
        return row


class AccessLogWriter:
    """Appends entries from concurrent requests on one thread, many per transaction (group commit).

    A request's future resolves only after the transaction holding its entry committed, so a read
    is still logged before its data leaves. Entries keep their submission order in the chain. If a
    batch fails, its entries are retried one per transaction, so one bad entry fails only its request.
    """

    def __init__(self, *, engine: sa.Engine, max_batch: int = 256) -> None:
        self.engine = engine
        self._writer = GroupCommitWriter(self._write, name="access-log-writer", max_batch=max_batch)

    def submit(self, data: AccessEntryCreate, at: datetime | None = None) -> Future:
        """Queue one entry; the future holds its committed row."""
        fut: Future = Future()
        self._writer.put((data, at, fut))
        return fut

    async def append(self, data: AccessEntryCreate, at: datetime | None = None) -> AccessEntry:
        """Append one entry and wait (without blocking the event loop) until it is committed."""
        return await asyncio.wrap_future(self.submit(data, at))

    def _write(self, batch: list) -> None:
        # a request that went away still gets its entry written: its data may have been read already
        live = [fut.set_running_or_notify_cancel() for _, _, fut in batch]
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                rows = append_many(session=session, items=[(d, at) for d, at, _ in batch])
                session.commit()
        except Exception as exc:  # noqa: BLE001 (every waiter hears of the failure)
            if len(batch) > 1:
                log.warning("access-log batch of %d failed (%s); appending one by one", len(batch),
                            type(exc).__name__)
                for item, ok in zip(batch, live):
                    self._write_one(item, ok)
                return
            if live[0]:
                batch[0][2].set_exception(exc)
            return
        for (_, _, fut), row, ok in zip(batch, rows, live):
            if ok:
                fut.set_result(row)

    def _write_one(self, item: tuple, live: bool) -> None:
        data, at, fut = item
        try:
            row = record_access(engine=self.engine, data=data, at=at)
        except Exception as exc:  # noqa: BLE001
            if live:
                fut.set_exception(exc)
            return
        if live:
            fut.set_result(row)

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._writer.stop(timeout=30)


def verify_log(*, engine: sa.Engine) -> ChainReport:
    """Verify the whole stored chain in seq order (read in batches)."""
    with Session(engine) as session:
        return verify_chain(((entry_of(r), r.hash) for r in rows_by_seq(session=session, table=AccessEntry)),
                            what="access-log entry")


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
