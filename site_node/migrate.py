"""Bring a site database to the newest schema with Alembic (idempotent)."""

from __future__ import annotations

from importlib.resources import files

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from evoclone.federated.stores.backup import backup_sqlite  # noqa: F401  (`evoclone site migrate --backup`)
from evoclone.federated.stores.schema_lock import exclusive


LOCK_KEY = 0x65766F7369746521  # "evosite!": the PostgreSQL advisory lock that serialises site migrations


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Run every pending migration on `engine` in one transaction, one process at a time (the SuperNode, the
    ClientApp and the API may open a new site database together)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(files("evoclone.site_node") / "migrations"))
    with exclusive(engine, lock_key=LOCK_KEY) as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current(engine: sa.Engine) -> str | None:
    """The schema revision a database is at (None before the first migration)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
