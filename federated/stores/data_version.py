"""A stamp that changes with every committed write to a service's database, shared by every process on the host.

A service keeps what it computed from its database (an API answer, a token's owner, the promoted model) with the
stamp it read *before* computing it, and uses it again only while the stamp is unchanged, so a write committed by
any of its processes (API workers, a dispatcher, a CLI command) is seen by the next read in every process. The
coordinator's response cache (`coordinator/api/response_cache.py`) and the site API's request-path memo
(`site_node/api/deps.py`) rest on it.

The stamp is 8 random bytes in a file of the service's state directory, rewritten after each committed transaction
that wrote a table the service watches (the coordinator: every table but its audit trail; the site: users, API
tokens and model versions). Reading it is one `pread` of the page cache. Writes are found with SQLAlchemy's session
events, on the engines the service registered with `track_writes`; a write that bypasses them (SQL typed into the
database by hand) is seen once the user's own time limit passes.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Hashable
from itertools import chain
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session

log = logging.getLogger("evoclone.stores")

FILE = "data.version"
_WROTE = "evoclone_tables_written"
_VERSIONS: weakref.WeakKeyDictionary[sa.Engine, tuple[DataVersion, Callable[[str | None], bool]]] = \
    weakref.WeakKeyDictionary()


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


def track_writes(engine: sa.Engine, version: DataVersion, watched: Callable[[str | None], bool]) -> None:
    """Bump `version` after every committed transaction of a session on `engine` that wrote a table for which
    `watched(table name)` holds (the version's file is closed when the engine goes)."""
    _VERSIONS[engine] = (version, watched)
    weakref.finalize(engine, version.close)


def tracked_engine(engine: sa.Engine, state_dir: Path, watched: Callable[[str | None], bool], *,
                   limit_setting: str) -> sa.Engine:
    """`engine`, its writes tracked (`track_writes`) in `state_dir`'s data version when that directory exists;
    where this process may not write it, a warning says that other processes see its writes only once their
    `limit_setting` has passed."""
    if Path(state_dir).is_dir():
        try:
            track_writes(engine, DataVersion(state_dir), watched)
        except OSError as exc:
            log.warning("data version %s not writable (%s): other processes see this one's writes within %s",
                        Path(state_dir) / FILE, exc.strerror, limit_setting)
    return engine


def version_of(engine: sa.Engine) -> DataVersion | None:
    tracked = _VERSIONS.get(engine)
    return None if tracked is None else tracked[0]


class Memo:
    """Values computed from the database, kept per process while `version` is unchanged and for at most
    `seconds` (the bound for writes that bypass the tracked engines); a bounded map, cleared when full.

    Read the stamp with `stamp()` *before* computing a value and `put` it with that stamp: a write that
    slipped in while the value was computed left a stamp the value does not carry.
    """

    MISS = object()

    def __init__(self, version: DataVersion, *, seconds: float, size: int = 4096) -> None:
        self.version, self.seconds, self.size = version, seconds, size
        self._entries: dict[Hashable, tuple[bytes, float, Any]] = {}

    def stamp(self) -> bytes:
        return self.version.current()

    def get(self, key: Hashable, stamp: bytes | None = None) -> Any:
        """The value kept under `key`, or Memo.MISS."""
        entry = self._entries.get(key)
        if entry is None or entry[0] != (self.stamp() if stamp is None else stamp) or entry[1] < time.monotonic():
            return Memo.MISS
        return entry[2]

    def put(self, key: Hashable, value: Any, stamp: bytes) -> None:
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[key] = (stamp, time.monotonic() + self.seconds, value)

    def value(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value kept under `key`, or `compute()` kept (an exception is raised, not kept)."""
        stamp = self.stamp()
        value = self.get(key, stamp)
        if value is Memo.MISS:
            value = compute()
            self.put(key, value, stamp)
        return value


def _mark(session: Session, tables: set[str | None]) -> None:
    session.info.setdefault(_WROTE, set()).update(tables)


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
    tables = session.info.pop(_WROTE, None)
    if tables:
        bind = session.get_bind()
        tracked = _VERSIONS.get(bind) if isinstance(bind, sa.Engine) else None
        if tracked is not None and any(tracked[1](t) for t in tables):
            tracked[0].bump()


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_WROTE, None)
