"""Consistent copies of the services' SQLite databases (before an upgrade migrates them)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import sqlalchemy as sa


def backup_sqlite(engine: sa.Engine, dest) -> None:
    """Copy a SQLite database to `dest` with SQLite's online backup (consistent while others write); mode 0600."""
    source = engine.url.database
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    with sqlite3.connect(source) as src, sqlite3.connect(tmp) as out:
        src.backup(out)
    os.replace(tmp, dest)
