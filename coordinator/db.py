"""The coordinator's database: one engine per app, its schema (migrations), sessions, and retries while it is away."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import sqlalchemy as sa
from sqlmodel import Session

from evoclone.federated.stores.engine import make_engine as engine_for

from . import models  # noqa: F401  (registers every table on SQLModel.metadata)
from .settings import CoordinatorSettings

T = TypeVar("T")


class DatabaseUnavailable(RuntimeError):
    """The database did not answer within the configured retry window."""


def make_engine(settings: CoordinatorSettings) -> sa.Engine:
    """An engine for the configured database (the services' shared SQLite/PostgreSQL setup), whose committed
    writes change the state directory's data version (federated/stores/data_version.py: what the API's response
    cache checks); every table but the audit trail counts (each request appends to it; no cached answer shows it)."""
    from evoclone.federated.stores.data_version import tracked_engine

    return tracked_engine(engine_for(settings.db_url), settings.state_dir, lambda table: table != "audit_event",
                          limit_setting="response_cache_seconds")


def create_tables(engine: sa.Engine) -> None:
    """Bring the schema to this release's with the migrations (on an empty database: every table).

    Safe when two workers start together (see `migrate.upgrade`); raises migrate.SchemaError for a database
    this release cannot migrate.
    """
    from .migrate import upgrade

    upgrade(engine)


def is_transient(exc: BaseException) -> bool:
    """Whether a database error means 'the server or connection went away', worth retrying."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        text = str(exc).lower()
        return not any(s in text for s in ("syntax", "no such table", "does not exist", "permission denied"))
    return False


def with_retry(fn: Callable[[], T], *, seconds: float, on_retry: Callable[[BaseException], None] | None = None) -> T:
    """Call `fn` until it stops failing transiently or `seconds` pass (then DatabaseUnavailable)."""
    deadline = time.monotonic() + seconds
    delay = 0.05
    while True:
        try:
            return fn()
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DBAPIError) as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise DatabaseUnavailable("the database is not reachable; retry in a few seconds or check "
                                          "EVOCLONE_COORDINATOR_DATABASE_URL") from exc
            if on_retry is not None:
                on_retry(exc)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def session_scope(engine: sa.Engine) -> Iterator[Session]:
    """A session that is closed afterwards (the caller commits)."""
    with Session(engine, expire_on_commit=False) as session:
        yield session
