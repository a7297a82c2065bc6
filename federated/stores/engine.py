"""SQL engines for the services: SQLite with WAL and foreign keys, PostgreSQL with a checked pool."""

from __future__ import annotations

import sqlite3
import time

import sqlalchemy as sa
from sqlmodel import create_engine

BUSY_TIMEOUT_S = 30.0  # how long a SQLite connection waits for another's lock before "database is locked"


def make_engine(url: str) -> sa.Engine:
    """An engine for `url`; pre-ping replaces connections the PostgreSQL server dropped."""
    if url.startswith("sqlite"):
        # as many pooled connections as the API's thread pool has threads (40): the default 5 (+10 overflow,
        # opened and closed per checkout) made each request under load open a connection and set its pragmas
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S}, pool_size=40,
                               max_overflow=10)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # WAL: readers never wait for the log writer
            cur = dbapi_conn.cursor()
            _use_wal(cur)
            # WAL with synchronous=NORMAL: a commit is atomic and survives a crash of the process, and the
            # fsync happens at checkpoints instead of on every commit (SQLite's recommended WAL setting)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_recycle=1800)


def _use_wal(cur) -> None:
    """Switch the database file to WAL (a persistent setting: later connections find it already set).

    SQLite answers a journal-mode change with SQLITE_BUSY at once, without its busy handler, while another
    connection holds a lock; processes opening a new database together (workers starting at once) retry here
    for as long as a busy connection would wait.
    """
    if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
        return
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def ping(engine: sa.Engine) -> None:
    """Run `SELECT 1` (raises when the database is unreachable)."""
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
