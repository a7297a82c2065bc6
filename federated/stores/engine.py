"""SQL engines for the services: SQLite with WAL and foreign keys, PostgreSQL with a checked pool."""

from __future__ import annotations

import sqlalchemy as sa
from sqlmodel import create_engine


def make_engine(url: str) -> sa.Engine:
    """An engine for `url`; pre-ping replaces connections the PostgreSQL server dropped."""
    if url.startswith("sqlite"):
        # as many pooled connections as the API's thread pool has threads (40): the default 5 (+10 overflow,
        # opened and closed per checkout) made each request under load open a connection and set its pragmas
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=40,
                               max_overflow=10)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # WAL: readers never wait for the log writer
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # WAL with synchronous=NORMAL: a commit is atomic and survives a crash of the process, and the
            # fsync happens at checkpoints instead of on every commit (SQLite's recommended WAL setting)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_recycle=1800)


def ping(engine: sa.Engine) -> None:
    """Run `SELECT 1` (raises when the database is unreachable)."""
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
