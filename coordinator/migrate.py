"""Bring the coordinator database to this release's schema with Alembic.

`upgrade` is idempotent and safe when several processes start together: each runs inside one transaction
that holds a lock the others wait for (SQLite's write lock taken by BEGIN IMMEDIATE; a PostgreSQL advisory
transaction lock), and reads the revision only once it holds it. A database that `create_all` made before
migrations existed (coordinator tables, no alembic_version) is adopted: compared with revision 0001, the
tables it lacks created (as create_all did), then stamped at 0001 and upgraded from there.
"""

from __future__ import annotations

from importlib.resources import files

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from evoclone.federated.stores.backup import backup_sqlite  # noqa: F401  (`evoclone coordinator migrate --backup`)
from evoclone.federated.stores.schema_lock import exclusive

BASE = "0001"  # the revision whose schema create_all made before migrations existed
_LOCK_KEY = 0x65766F636F6F7264  # "evocoord": the PostgreSQL advisory lock that serialises migrations


class SchemaError(RuntimeError):
    """The database's schema cannot be brought to this release's (migrated by a newer release, or foreign)."""


def table_names() -> frozenset[str]:
    """The coordinator's tables (SQLModel's one MetaData may also hold the site node's when both are imported)."""
    from sqlmodel.main import default_registry

    from . import models  # noqa: F401  (registers every coordinator table)

    prefix = __package__ + "."
    return frozenset(m.local_table.name for m in default_registry.mappers if m.class_.__module__.startswith(prefix))


def _config(connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(files("evoclone.coordinator") / "migrations"))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision this release knows."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def upgrade(engine: sa.Engine, revision: str = "head") -> str | None:
    """Run every pending migration on `engine` in one transaction; the revision the database is at afterwards.

    Raises SchemaError for a database at a revision this release does not know, or with coordinator tables
    but no migration history that differ from revision 0001.
    """
    with exclusive(engine, lock_key=_LOCK_KEY) as conn:
        cfg = _config(conn)
        script = ScriptDirectory.from_config(cfg)
        at = MigrationContext.configure(conn).get_current_revision()
        if at is None:
            _adopt(conn, cfg, script)
        elif at not in {rev.revision for rev in script.walk_revisions()}:
            raise SchemaError(f"the coordinator database is at schema revision {at}, which this release does not "
                              f"know (its newest is {script.get_current_head()}): a newer EvoClone migrated it; run "
                              "that release, or restore the database backup taken before the upgrade")
        command.upgrade(cfg, revision)
        return MigrationContext.configure(conn).get_current_revision()


def current(engine: sa.Engine) -> str | None:
    """The schema revision a database is at (None before the first migration)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _base_schema(script: ScriptDirectory) -> sa.MetaData:
    """Revision 0001's tables, from its migration module."""
    return script.get_revision(BASE).module.schema()


def schema_differences(conn: sa.Connection, meta: sa.MetaData) -> list:
    """Alembic's autogenerate comparison of the database with `meta`, limited to `meta`'s tables."""
    names = set(meta.tables)
    ctx = MigrationContext.configure(conn, opts={
        "compare_type": True,
        "include_name": lambda name, type_, _parents: type_ != "table" or name in names})
    return compare_metadata(ctx, meta)


def _adopt(conn: sa.Connection, cfg: Config, script: ScriptDirectory) -> None:
    """Stamp a database that create_all made at BASE; an empty one is left to the migrations."""
    base = _base_schema(script)
    if not set(sa.inspect(conn).get_table_names()) & set(base.tables):
        return
    diffs = schema_differences(conn, base)
    missing = [d[1] for d in diffs if isinstance(d, tuple) and d[0] == "add_table"]
    missing_names = {t.name for t in missing}
    other = [d for d in diffs if not (isinstance(d, tuple) and (
        d[0] == "add_table" or (d[0] == "add_index" and d[1].table.name in missing_names)))]
    if other:
        raise SchemaError(
            f"the coordinator database has coordinator tables but no migration history, and they differ from "
            f"schema revision {BASE} ({'; '.join(_describe(d) for d in other[:3])}"
            f"{f'; {len(other) - 3} more' if len(other) > 3 else ''}): check that the database URL names this "
            "coordinator's database, or restore it from a backup made by the release that created it")
    if missing:  # tables added by releases newer than the one that made this database: create_all made them
        base.create_all(conn, tables=[base.tables[t.name] for t in missing], checkfirst=True)
    command.stamp(cfg, BASE)


def _describe(diff) -> str:
    """One autogenerate difference in a few words: 'remove_column study.arms'."""
    if isinstance(diff, list):  # modify_* differences come as a list per column
        diff = diff[0]
    op, rest = diff[0], diff[1:]
    if op.startswith("modify_") and len(rest) >= 3:
        return f"{op} {rest[1]}.{rest[2]}"
    if op in ("add_column", "remove_column"):
        return f"{op} {rest[1]}.{rest[2].name}"
    obj = rest[0]
    table = getattr(obj, "table", None)
    name = getattr(obj, "name", None) or getattr(table, "name", "?")
    return f"{op} {name}"
