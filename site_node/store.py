"""The site's transactional store (SQLModel on SQLite or PostgreSQL): anonymized patients only.

Records are encrypted at rest: each ingest batch gets a fresh AES-256-GCM data key, wrapped
by the site's active master key; every record is bound to its pseudonym, so tampering or
moving a ciphertext is detected on read. Equality of content is checked with a keyed
HMAC, so the stored hash cannot be matched against guessed records.
"""

from __future__ import annotations

import hashlib
import hmac
import queue
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import NamedTuple, TypeVar

from sqlalchemy import LargeBinary, func, insert, update
from sqlmodel import Column, Field, Session, SQLModel, create_engine, select

from evoclone.federated.record import PatientRecord
from evoclone.privacy.envelope import WrappedKey, new_key, open_sealed, rewrap, seal, unwrap, wrap

from .keyring import Keyring


class DataKeyRow(SQLModel, table=True):
    """A per-batch data key, stored only wrapped by a master key."""

    __tablename__ = "data_key"

    id: int | None = Field(default=None, primary_key=True)
    master_id: str
    nonce: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    wrapped: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


class PatientBase(SQLModel):
    """Columns shared by the table and its public view."""

    site: str = Field(index=True)
    n_events: int = 0


class PatientRow(PatientBase, table=True):
    """One anonymized canonical record, encrypted, keyed by its pseudonym."""

    __tablename__ = "patient"

    pseudonym: str = Field(primary_key=True)
    content_mac: str = Field(index=True)
    data_key_id: int = Field(foreign_key="data_key.id")
    ciphertext: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class QuarantineRow(SQLModel, table=True):
    """A rejected row kept with its reason (`--allow-partial`); never the row's content."""

    __tablename__ = "quarantine"

    id: int | None = Field(default=None, primary_key=True)
    batch: str = Field(index=True)
    source: str
    location: str
    field: str
    reason: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


T = TypeVar("T")


class RecordPayload(NamedTuple):
    """A record ready to seal: its pseudonym, site, number of events and canonical JSON (the bytes
    `PatientRecord.model_dump_json()` writes: what is encrypted and what the content MAC covers)."""

    patient_id: str
    site: str
    n_events: int
    payload: bytes

    @classmethod
    def of(cls, record: PatientRecord | RecordPayload) -> RecordPayload:
        if isinstance(record, RecordPayload):
            return record
        return cls(record.patient_id, record.site, len(record.events), record.model_dump_json().encode())


def ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """`items`, produced by a background thread up to `depth` ahead of the caller, so the producer's Python
    work overlaps the caller's waits on the database (drivers release the GIL while they wait). The
    producer's exception is raised here; the producer stops when the caller stops iterating."""
    buffer: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            put((end, exc))

    thread = threading.Thread(target=produce, name="evoclone-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = buffer.get()
            if item is end:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _batches(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class SiteStore:
    """Keyword-only data access over one site's database."""

    def __init__(self, *, url: str, keyring: Keyring, mac_key: bytes) -> None:
        self.engine = create_engine(url)
        self.keyring = keyring
        self._mac_key = mac_key
        from .migrate import upgrade

        upgrade(self.engine)  # Alembic: the same migrations on SQLite and PostgreSQL
        from .review import seal_legacy_reviews

        seal_legacy_reviews(engine=self.engine, keyring=keyring)  # twins stored before encryption (0004)

    def _mac(self, payload: bytes) -> str:
        return hmac.new(self._mac_key, b"record\x1f" + payload, hashlib.sha256).hexdigest()

    def upsert_records(self, *, records: Iterable[PatientRecord | RecordPayload],
                       quarantine: Iterable[tuple[str, str, str, str]] = (), batch: str = "") -> int:
        """Insert or update records, and quarantine rejected rows (source, location, field,
        reason), in one transaction (all or nothing); returns records written."""
        written = 0
        data_key = new_key()
        with Session(self.engine) as session, session.begin():
            for source, location, field, reason in quarantine:
                session.add(QuarantineRow(batch=batch, source=source, location=location, field=field, reason=reason))
            w = wrap(data_key, master_key=self.keyring.active_key, master_id=self.keyring.active)
            key_row = DataKeyRow(master_id=w.master_id, nonce=w.nonce, wrapped=w.ciphertext)
            session.add(key_row)
            session.flush()
            def sealed(chunk: list) -> list[tuple[RecordPayload, str, bytes]]:
                out = []
                for r in map(RecordPayload.of, chunk):
                    out.append((r, self._mac(r.payload), seal(r.payload, data_key=data_key,
                                                             context=r.patient_id.encode())))
                return out

            # bounded memory, one transaction; with a database server, records are serialized, MACed and sealed
            # a chunk or two ahead in a thread while this one waits for the server
            chunks = (sealed(c) for c in _batches(records, 2000))
            if self.engine.dialect.name != "sqlite":  # a server: overlap its waits (in-process SQLite holds the GIL)
                chunks = ahead(chunks)
            for chunk in chunks:
                written += self._upsert_chunk(session, chunk, key_id=key_row.id)
            if written == 0:
                session.delete(key_row)
        return written

    def _upsert_chunk(self, session: Session, prepared: list[tuple[RecordPayload, str, bytes]], *,
                      key_id: int) -> int:
        ids = [r.patient_id for r, _, _ in prepared]
        existing: dict[str, str] = dict(session.exec(select(PatientRow.pseudonym, PatientRow.content_mac)
                                                     .where(PatientRow.pseudonym.in_(ids))).all())
        inserts, updates = [], []
        for r, mac, ciphertext in prepared:
            if existing.get(r.patient_id) == mac:
                continue  # same content already stored: idempotent re-ingest
            row = {"pseudonym": r.patient_id, "site": r.site, "n_events": r.n_events, "content_mac": mac,
                   "data_key_id": key_id, "ciphertext": ciphertext}
            (updates if r.patient_id in existing else inserts).append(row)
        if inserts:  # executemany: one round trip per chunk on PostgreSQL and SQLite
            session.execute(insert(PatientRow), inserts)
        if updates:
            session.execute(update(PatientRow), updates)
        return len(inserts) + len(updates)

    def records(self) -> list[PatientRecord]:
        """All records, decrypted and authenticated, ordered by pseudonym."""
        with Session(self.engine) as session:
            keys = {k.id: k for k in session.exec(select(DataKeyRow)).all()}
            plain: dict[int, bytes] = {}
            out = []
            for row in session.exec(select(PatientRow).order_by(PatientRow.pseudonym)).all():
                if row.data_key_id not in plain:
                    k = keys[row.data_key_id]
                    plain[row.data_key_id] = unwrap(WrappedKey(k.master_id, k.nonce, k.wrapped),
                                                    master_key=self.keyring.keys[k.master_id])
                payload = open_sealed(row.ciphertext, data_key=plain[row.data_key_id], context=row.pseudonym.encode())
                out.append(PatientRecord.model_validate_json(payload))
            return out

    def counts(self) -> dict[str, int]:
        """Number of patients and timeline events stored."""
        with Session(self.engine) as session:
            patients = session.exec(select(func.count()).select_from(PatientRow)).one()
            events = session.exec(select(func.coalesce(func.sum(PatientRow.n_events), 0))).one()
            quarantined = session.exec(select(func.count()).select_from(QuarantineRow)).one()
        return {"patients": int(patients), "events": int(events), "quarantined": int(quarantined)}

    def rewrap_data_keys(self, *, new_keyring: Keyring) -> int:
        """Re-wrap every data key under `new_keyring`'s active key in one transaction."""
        n = 0
        with Session(self.engine) as session, session.begin():
            for k in session.exec(select(DataKeyRow)).all():
                w = rewrap(WrappedKey(k.master_id, k.nonce, k.wrapped), old_master=self.keyring.keys[k.master_id],
                           new_master=new_keyring.active_key, new_id=new_keyring.active)
                k.master_id, k.nonce, k.wrapped = w.master_id, w.nonce, w.ciphertext
                session.add(k)
                n += 1
        self.keyring = new_keyring
        return n

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()
