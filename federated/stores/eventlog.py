"""Events and logs (semi-structured, append-mostly): SQLite JSON by default, MongoDB in production.

Entries are aggregate, identifier-free documents (ingest batches, training rounds, audit
summaries); callers never put patient rows here.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from datetime import datetime, timezone

import sqlalchemy as sa


class EventLog(ABC):
    """Append documents of a kind; read them back newest first."""

    @abstractmethod
    def append_many(self, *, kind: str, documents: Iterable[dict]) -> int:
        """Append documents in bulk; returns how many were written."""

    def append(self, *, kind: str, document: dict) -> None:
        """Append one document."""
        self.append_many(kind=kind, documents=[document])

    @abstractmethod
    def query(self, *, kind: str, limit: int = 100) -> list[dict]:
        """Documents of a kind, newest first, each with `kind` and `at` (UTC) added."""

    @abstractmethod
    def count(self, *, kind: str | None = None) -> int:
        """How many documents (of a kind)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


def _stamp(kind: str, doc: dict) -> dict:
    if not isinstance(doc, dict):
        raise ValueError("an event document must be a JSON object")
    return {**doc, "kind": kind, "at": datetime.now(timezone.utc).isoformat()}


class SqlEventLog(EventLog):
    """A JSON column in SQLite (or any SQLAlchemy database)."""

    def __init__(self, *, url: str) -> None:
        self.engine = sa.create_engine(url)
        meta = sa.MetaData()
        self.table = sa.Table("event_log", meta, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                              sa.Column("kind", sa.String(64), index=True, nullable=False),
                              sa.Column("at", sa.String(40), nullable=False), sa.Column("doc", sa.JSON, nullable=False))
        meta.create_all(self.engine)

    def append_many(self, *, kind: str, documents: Iterable[dict]) -> int:
        rows = [{"kind": kind, "at": d["at"], "doc": d} for d in (_stamp(kind, x) for x in documents)]
        if rows:
            with self.engine.begin() as c:
                c.execute(self.table.insert(), rows)
        return len(rows)

    def query(self, *, kind: str, limit: int = 100) -> list[dict]:
        q = sa.select(self.table.c.doc).where(self.table.c.kind == kind).order_by(self.table.c.id.desc()).limit(limit)
        with self.engine.connect() as c:
            return [dict(r[0]) if isinstance(r[0], dict) else json.loads(r[0]) for r in c.execute(q)]

    def count(self, *, kind: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(self.table)
        if kind is not None:
            q = q.where(self.table.c.kind == kind)
        with self.engine.connect() as c:
            return int(c.execute(q).scalar_one())

    def close(self) -> None:
        self.engine.dispose()


class MongoEventLog(EventLog):
    """A MongoDB collection (pymongo), bulk `insert_many`."""

    def __init__(self, *, url: str, database: str = "evoclone", collection: str = "event_log") -> None:
        from pymongo import MongoClient

        self.client = MongoClient(url, serverSelectionTimeoutMS=5000, tz_aware=True)
        self.coll = self.client[database][collection]
        self.coll.create_index("kind")

    def append_many(self, *, kind: str, documents: Iterable[dict]) -> int:
        docs = [_stamp(kind, d) for d in documents]
        if docs:
            self.coll.insert_many(docs, ordered=True)
        return len(docs)

    def query(self, *, kind: str, limit: int = 100) -> list[dict]:
        cur = self.coll.find({"kind": kind}, {"_id": False}).sort("_id", -1).limit(limit)
        return [dict(d) for d in cur]

    def count(self, *, kind: str | None = None) -> int:
        return int(self.coll.count_documents({} if kind is None else {"kind": kind}))

    def close(self) -> None:
        self.client.close()


def open_event_log(url: str) -> EventLog:
    """`mongodb://...` selects MongoDB; anything else is an SQLAlchemy URL."""
    return MongoEventLog(url=url) if url.startswith(("mongodb://", "mongodb+srv://")) else SqlEventLog(url=url)
