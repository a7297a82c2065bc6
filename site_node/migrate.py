"""Bring a site database to the newest schema with Alembic (idempotent)."""

from __future__ import annotations

from importlib.resources import files

import sqlalchemy as sa
from alembic import command
from alembic.config import Config


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Run every pending migration on `engine` inside one transaction."""
    cfg = Config()
    cfg.set_main_option("script_location", str(files("evoclone.site_node") / "migrations"))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current(engine: sa.Engine) -> str | None:
    """The schema revision a database is at (None before the first migration)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def backup_sqlite(engine: sa.Engine, dest) -> None:
    """Copy a SQLite database to `dest` with SQLite's online backup (consistent while others write); mode 0600."""
    import os
    import sqlite3
    from pathlib import Path

    source = engine.url.database
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    with sqlite3.connect(source) as src, sqlite3.connect(tmp) as out:
        src.backup(out)
    os.replace(tmp, dest)
