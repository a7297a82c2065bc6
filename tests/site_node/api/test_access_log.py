"""The hash-chained access log: `evoclone site audit verify` finds an edited, removed or reordered entry
(on SQLite and PostgreSQL) and prints the chain head; chain_head(engine) for the compliance self-check."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from evoclone.cli.main import app

runner = CliRunner()


@pytest.fixture
def logged_site(site_dir, db_url):
    """A site on SQLite, then PostgreSQL, whose access log holds four reads; (site_dir, engine)."""
    from evoclone.federated.stores.engine import make_engine
    from evoclone.site_node.access_log import AccessEntryCreate, record_access
    from evoclone.site_node.migrate import upgrade
    from evoclone.site_node.settings import get_settings

    cfg = json.loads((site_dir / "site.json").read_text())
    (site_dir / "site.json").write_text(json.dumps({**cfg, "database_url": db_url}))
    get_settings.cache_clear()
    engine = make_engine(db_url)
    upgrade(engine)
    t0 = datetime(2030, 1, 7, 9, tzinfo=timezone.utc)
    for i, reason in enumerate(("treatment", "review", "review", "safety")):
        record_access(engine=engine, at=t0 + timedelta(minutes=i), data=AccessEntryCreate(
            actor="ana", role="clinician", action="patient.read", pseudonym=f"P-{i:032x}", reason=reason))
    try:
        yield site_dir, engine
    finally:
        engine.dispose()
        get_settings.cache_clear()


def _verify(site_dir):
    return runner.invoke(app, ["site", "audit", "verify", "--site-dir", str(site_dir), "--json"])


def test_an_intact_log_verifies_and_shows_its_head(logged_site):
    from evoclone.site_node.access_log import chain_head

    site_dir, engine = logged_site
    r = _verify(site_dir)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["entries"] == 4 and doc["seq"] == 4 and len(doc["hash"]) == 64
    assert chain_head(engine) == doc
    assert chain_head(engine, verify=False)["hash"] == doc["hash"]
    r = runner.invoke(app, ["site", "audit", "verify", "--site-dir", str(site_dir)])
    assert r.exit_code == 0 and f"head seq 4 hash {doc['hash']}" in r.stdout


def _edit(conn):
    conn.execute(sa.text("UPDATE access_log SET reason = 'research' WHERE seq = 2"))


def _remove(conn):
    conn.execute(sa.text("DELETE FROM access_log WHERE seq = 2"))


def _reorder(conn):
    conn.execute(sa.text("UPDATE access_log SET seq = -1 WHERE seq = 2"))
    conn.execute(sa.text("UPDATE access_log SET seq = 2 WHERE seq = 3"))
    conn.execute(sa.text("UPDATE access_log SET seq = 3 WHERE seq = -1"))


def _remove_last(conn):
    conn.execute(sa.text("DELETE FROM access_log WHERE seq = 4"))


@pytest.mark.parametrize("tamper, problem", [
    (_edit, "access-log entry 2 was modified after it was written"),
    (_remove, "access-log entry 2 is missing or reordered"),
    (_reorder, "access-log entry 2 does not link to access-log entry 1"),
])
def test_verify_finds_the_first_edited_removed_or_reordered_entry(logged_site, tamper, problem):
    site_dir, engine = logged_site
    with engine.begin() as conn:
        tamper(conn)
    r = _verify(site_dir)
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["first_bad_seq"] in (2, 3) and problem in doc["problem"]
    assert doc["seq"] == 1  # the head is the last entry that verified
    assert "access log broken" in r.stderr and problem in " ".join(r.stderr.split())


def test_truncating_the_tail_is_seen_against_a_recorded_head(logged_site):
    """A removed last entry leaves a valid shorter chain: the head the compliance self-check recorded tells."""
    from evoclone.site_node.access_log import chain_head

    site_dir, engine = logged_site
    recorded = chain_head(engine)
    with engine.begin() as conn:
        _remove_last(conn)
    now = chain_head(engine)
    assert now["ok"] is True and (now["seq"], now["hash"]) != (recorded["seq"], recorded["hash"])


def test_appends_from_concurrent_requests_keep_one_chain(logged_site):
    from concurrent.futures import ThreadPoolExecutor

    from evoclone.site_node.access_log import AccessEntryCreate, record_access

    site_dir, engine = logged_site
    data = AccessEntryCreate(actor="bo", role="clinician", action="patient.read", pseudonym="P-" + "1" * 32,
                             reason="review")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: record_access(engine=engine, data=data), range(12)))
    assert json.loads(_verify(site_dir).stdout)["entries"] == 16
