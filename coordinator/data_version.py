"""A stamp that changes with every committed write to the coordinator's database, shared by every process on the host.

The API's response cache (`api/response_cache.py`) keeps the answer of a registry or status GET with the stamp it
read before computing it, and serves it again only while the stamp is unchanged, so a write committed by any API
worker, the run dispatcher or a CLI command is seen by the next read in every process.

The stamp is 8 random bytes in `<state dir>/data.version`, rewritten after each committed transaction that wrote
anything but the audit trail (every request appends to the audit trail; none of the cached answers shows it).
Reading it is one `pread` of the page cache. Writes are found with SQLAlchemy's session events, on the engines
`coordinator.db.make_engine` makes (every coordinator process uses those); a write that bypasses them (SQL typed
into the database by hand) is seen once the cache's time limit passes.
"""

from __future__ import annotations

import os
import weakref
from itertools import chain
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session

FILE = "data.version"
UNTRACKED = frozenset({"audit_event"})  # written by every request; no cached answer shows it
_WROTE = "evoclone_data_written"
_VERSIONS: weakref.WeakKeyDictionary[sa.Engine, DataVersion] = weakref.WeakKeyDictionary()


class DataVersion:
    """The state directory's stamp: `current()` to read it, `bump()` after a committed write."""

    def __init__(self, state_dir: Path) -> None:
        path = Path(state_dir) / FILE
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < 8:
            self.bump()

    def current(self) -> bytes:
        return os.pread(self._fd, 8, 0)

    def bump(self) -> None:
        os.pwrite(self._fd, os.urandom(8), 0)

    def close(self) -> None:
        os.close(self._fd)


def track_writes(engine: sa.Engine, version: DataVersion) -> None:
    """Bump `version` after every committed transaction of a session on `engine` that wrote a tracked table
    (the version's file is closed when the engine goes)."""
    _VERSIONS[engine] = version
    weakref.finalize(engine, version.close)


def version_of(engine: sa.Engine) -> DataVersion | None:
    return _VERSIONS.get(engine)


def _mark(session: Session, tables: set[str | None]) -> None:
    if tables - UNTRACKED:
        session.info[_WROTE] = True


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _context) -> None:
    _mark(session, {getattr(type(obj), "__tablename__", None)
                    for obj in chain(session.new, session.dirty, session.deleted)})


@event.listens_for(Session, "do_orm_execute")
def _after_statement(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:  # bulk statements run through a session
        table = getattr(state.statement, "table", None)
        _mark(state.session, {getattr(table, "name", None)})


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.info.pop(_WROTE, False):
        bind = session.get_bind()
        version = _VERSIONS.get(bind) if isinstance(bind, sa.Engine) else None
        if version is not None:
            version.bump()


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_WROTE, None)
