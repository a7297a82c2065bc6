"""The coordinator's Alembic migrations: an empty database upgraded equals the models (SQLite and PostgreSQL),
a database made by create_all before migrations existed is adopted, upgrades are idempotent and serialised
between processes, `evoclone coordinator migrate --backup` works and a database newer than the code is refused."""

from __future__ import annotations

import json
import sqlite3
import stat

import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel, select
from typer.testing import CliRunner

from evoclone.coordinator.migrate import SchemaError, current, head, schema_differences, table_names, upgrade
from evoclone.federated.stores.engine import make_engine

from ..concurrency import upgraded_at_once

runner = CliRunner()


def coordinator_metadata() -> sa.MetaData:
    """A copy of the coordinator's tables only (SQLModel.metadata also holds the site's once they are imported)."""
    meta = sa.MetaData()
    for table in SQLModel.metadata.sorted_tables:
        if table.name in table_names():
            table.to_metadata(meta)
    return meta


@pytest.fixture
def engine(db_url):
    e = make_engine(db_url)
    yield e
    e.dispose()


def legacy_create_all(engine) -> None:
    """What releases before migrations did at start: create_all of the coordinator's tables."""
    coordinator_metadata().create_all(engine)


def test_upgrading_an_empty_database_gives_exactly_the_models_and_is_idempotent(engine):
    from evoclone.site_node import access_log, auth_models, local_models, review_models, store  # noqa: F401

    assert "patient" in SQLModel.metadata.tables  # the site's tables share the MetaData: they must stay out
    assert current(engine) is None
    assert upgrade(engine) == head() == "0001"
    assert set(sa.inspect(engine).get_table_names()) == table_names() | {"alembic_version"}
    with engine.connect() as conn:
        assert schema_differences(conn, coordinator_metadata()) == []
    assert upgrade(engine) == "0001" and current(engine) == "0001"


def test_a_create_all_database_is_adopted_with_its_rows(engine):
    from evoclone.coordinator.models import User, UserCreate
    from evoclone.coordinator.users import create_user

    legacy_create_all(engine)
    with Session(engine) as session:
        create_user(session=session, data=UserCreate(username="ana", role="admin", password="x" * 12))
        session.commit()
    assert current(engine) is None
    assert upgrade(engine) == "0001"
    with Session(engine) as session:
        assert session.exec(select(User.username)).all() == ["ana"]
    with engine.connect() as conn:
        assert schema_differences(conn, coordinator_metadata()) == []


def test_adoption_creates_tables_an_older_release_lacked_and_refuses_other_differences(tmp_path):
    older = make_engine(f"sqlite:///{tmp_path / 'older.db'}")
    meta = coordinator_metadata()
    meta.create_all(older, tables=[t for t in meta.sorted_tables if t.name not in ("canary_report", "rollout")])
    assert upgrade(older) == "0001"
    assert {"canary_report", "rollout"} <= set(sa.inspect(older).get_table_names())
    older.dispose()

    foreign = make_engine(f"sqlite:///{tmp_path / 'foreign.db'}")
    legacy_create_all(foreign)
    with foreign.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE study DROP COLUMN indication")
    with pytest.raises(SchemaError, match=r"differ from schema revision 0001 \(add_column study.indication\)"):
        upgrade(foreign)
    assert current(foreign) is None  # nothing stamped
    foreign.dispose()


def test_workers_starting_together_migrate_once(db_url):
    with upgraded_at_once(db_url, upgrade) as (engines, results, errors):
        assert errors == [] and results == ["0001"] * 4
        with engines[0].connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1


def test_cli_migrate_backs_up_adopts_and_refuses_a_newer_database(state_dir, tmp_path):
    from evoclone.cli.main import app

    db = state_dir / "coordinator.db"
    before = make_engine(f"sqlite:///{db}")
    legacy_create_all(before)
    before.dispose()
    backup = tmp_path / "backups" / "coordinator-0.1.0.db"
    r = runner.invoke(app, ["coordinator", "migrate", "--state-dir", str(state_dir), "--backup", str(backup),
                            "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == {"from": None, "to": "0001", "changed": True, "backup": str(backup)}
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    with sqlite3.connect(backup) as copy:  # taken before the migration: the tables, no migration history yet
        names = {row[0] for row in copy.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "coord_user" in names and "alembic_version" not in names

    r = runner.invoke(app, ["coordinator", "migrate", "--state-dir", str(state_dir), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["changed"] is False

    with sqlite3.connect(db) as live:
        live.execute("UPDATE alembic_version SET version_num = '0999'")
    r = runner.invoke(app, ["coordinator", "migrate", "--state-dir", str(state_dir)])
    assert r.exit_code == 2
    assert "revision 0999, which this release does not know" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_migrate_of_a_new_state_directory_creates_the_schema_without_a_backup(state_dir, tmp_path):
    from evoclone.cli.main import app

    backup = tmp_path / "b.db"
    r = runner.invoke(app, ["coordinator", "migrate", "--state-dir", str(state_dir), "--backup", str(backup),
                            "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == {"from": None, "to": "0001", "changed": True, "backup": None}
    assert not backup.exists()
