"""One migrating process at a time, and each migration all or nothing (shared by the site and the coordinator)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa


@contextmanager
def exclusive(engine: sa.Engine, *, lock_key: int) -> Iterator[sa.Connection]:
    """A connection inside a transaction that one migrating process holds at a time (committed on success).

    SQLite: BEGIN IMMEDIATE takes the write lock first (others wait for the busy timeout), and makes the
    DDL that follows one transaction (the driver would otherwise commit each DDL statement on its own).
    PostgreSQL: a transaction-scoped advisory lock on `lock_key` (its DDL is transactional anyway).
    """
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key})
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
