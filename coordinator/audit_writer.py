"""Group commit of the per-request audit trail: each request's event is durable before its response starts.

Requests hand their event to one writer thread per process (federated.stores.group_commit) and wait. The
writer takes everything queued so far, appends it to the hash chain in one transaction (one chain lock, one
read of the head, one insert, one commit) and then wakes every request of the batch; while it commits, the
next batch queues up. A request is answered only after the commit that holds its event returned, so the
guarantee is the same as one transaction per request, at one commit (one fsync) per batch instead of per
request.

With SQLite, the writers of several API processes also take turns on a lock file next to the database
(`coordinator.db-audit-lock`): a blocked flock wakes as soon as the other writer commits, where SQLite's
busy handler would sleep in growing steps.

Durable means flushed to disk at commit: the writer's SQLite connections use synchronous=FULL (the WAL is
fsynced at each commit; the app's other connections keep WAL's NORMAL) and its PostgreSQL transactions use
the server's synchronous_commit (on by default).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from evoclone.federated.stores.engine import make_engine
from evoclone.federated.stores.group_commit import GroupCommitWriter

from .audit import append_events

log = logging.getLogger("evoclone.coordinator")


class AuditUnavailable(RuntimeError):
    """The batch holding an event could not be committed within the retry window."""


def durable_engine(url: str) -> sa.Engine:
    """An engine for `url` whose commits are flushed to disk (SQLite: synchronous=FULL on its connections)."""
    engine = make_engine(url)
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _full(dbapi_conn, _record) -> None:  # runs after make_engine's pragmas (WAL, NORMAL)
            dbapi_conn.execute("PRAGMA synchronous=FULL")

    return engine


class AuditWriter:
    """One writer thread that group-commits audit events; `await writer.record(**fields)` returns once committed.

    `retry` wraps each batch's write (the service passes its database retry: a batch is retried while the
    database is away, then every request of it gets AuditUnavailable). The thread starts on first use.
    """

    def __init__(self, url: str, *, retry: Callable[[Callable[[], Any]], Any], max_batch: int = 500) -> None:
        self.url, self.retry = url, retry
        self._engine: sa.Engine | None = None
        self._lock_fd: int | None = None
        self._writer = GroupCommitWriter(self._commit, name="audit-writer", max_batch=max_batch,
                                         on_start=self._open)
        self.batches = self.events = 0  # counters for tests and metrics

    async def record(self, **fields: Any) -> None:
        """Queue one event (append_event's keyword arguments) and wait until its batch is committed."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._writer.put((fields, loop, done))
        await asyncio.shield(done)  # a cancelled request still has its event written

    def _open(self) -> None:
        if self._engine is not None:
            return
        self._engine = durable_engine(self.url)
        database = self._engine.url.database
        if self._engine.dialect.name == "sqlite" and database not in (None, "", ":memory:"):
            self._lock_fd = os.open(f"{database}-audit-lock", os.O_RDWR | os.O_CREAT, 0o600)

    def stop(self, timeout: float = 10) -> None:
        """Write what is queued, stop the thread and close its connections."""
        self._writer.stop(timeout)
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _commit(self, batch: list) -> None:
        error: BaseException | None = None
        try:
            self.retry(lambda: self._write([fields for fields, _, _ in batch]))
            self.batches, self.events = self.batches + 1, self.events + len(batch)
        except Exception as exc:  # noqa: BLE001 (handed to every waiting request, which decides what to answer)
            log.exception("%d audit events could not be written", len(batch))
            error = exc
        waiting: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
        for _, loop, done in batch:
            waiting.setdefault(loop, []).append(done)
        for loop, futures in waiting.items():  # one wake-up per event loop, not per request
            try:
                loop.call_soon_threadsafe(_settle, futures, error)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """This process's turn among the SQLite audit writers (no-op for PostgreSQL: its advisory lock queues)."""
        if self._lock_fd is None:
            yield
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _write(self, events: list[dict[str, Any]]) -> None:
        with self._turn(), Session(self._engine) as session:
            append_events(session=session, events=events)
            session.commit()


def _settle(futures: list[asyncio.Future], error: BaseException | None) -> None:
    for done in futures:
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(AuditUnavailable(f"the audit trail could not be written ({type(error).__name__})"))
