import json
import stat

import pytest
from typer.testing import CliRunner

from evoclone.cli.main import app

runner = CliRunner()


def test_site_init_ingest_stats_snapshot_rotate(small_cohort, tmp_path):
    _, out = small_cohort
    site = tmp_path / "st-mary"
    r = runner.invoke(app, ["site", "init", "--site-dir", str(site), "--name", "st-mary"])
    assert r.exit_code == 0, r.stderr
    assert stat.S_IMODE((site / "secret.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((site / "master.keys").stat().st_mode) == 0o600
    assert runner.invoke(app, ["site", "init", "--site-dir", str(site), "--name", "x"]).exit_code == 2

    r = runner.invoke(app, ["site", "ingest", str(out / "site-1"), "--site-dir", str(site), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["accepted"] == doc["patients"] == 80 and doc["rejected"] == 0 and doc["errors"] == []

    bad = runner.invoke(app, ["site", "ingest", str(out / "site-1" / "patients.csv"), str(out / "site-2" / "events.csv"),
                              "--site-dir", str(site), "--json"])
    assert bad.exit_code == 2
    errors = json.loads(bad.stdout)["errors"]
    assert errors[0]["source"] == "events.csv" and errors[0]["field"] == "mrn" and errors[0]["location"] == "line 2"

    r = runner.invoke(app, ["site", "stats", "--site-dir", str(site), "--json"])
    assert json.loads(r.stdout) == {"patients": 80, "events": doc["events"], "quarantined": 0}

    r = runner.invoke(app, ["site", "export-snapshot", "--site-dir", str(site), "--out", str(tmp_path / "snap.jsonl.gz")])
    assert r.exit_code == 0 and (tmp_path / "snap.jsonl.gz").is_file()
    assert (tmp_path / "feedback.jsonl").read_text().startswith('{"format": "evoclone-feedback/1"}')  # no verdicts yet

    r = runner.invoke(app, ["site", "rotate-key", "--site-dir", str(site), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["active"] == "k2"
    r = runner.invoke(app, ["site", "stats", "--site-dir", str(site), "--json"])
    assert json.loads(r.stdout)["patients"] == 80


def test_site_commands_on_a_non_site_directory(tmp_path):
    r = runner.invoke(app, ["site", "stats", "--site-dir", str(tmp_path), "--json"])
    assert r.exit_code == 2 and "site init" in r.stderr
    r = runner.invoke(app, ["site", "init", "--site-dir", str(tmp_path / "s"), "--name", "bad name!"])
    assert r.exit_code == 2 and "name" in r.stderr and not (tmp_path / "s").exists()


def test_privacy_report(small_cohort, tmp_path):
    _, out = small_cohort
    site = tmp_path / "s"
    runner.invoke(app, ["site", "init", "--site-dir", str(site), "--name", "s"])
    runner.invoke(app, ["site", "ingest", str(out / "site-2"), "--site-dir", str(site)])
    r = runner.invoke(app, ["site", "privacy-report", "--site-dir", str(site), "--k", "5", "--sensitive", "diabetes", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["as_stored"]["records"] == 80 and doc["as_stored"]["records_below_k"] > 0  # exact ages are rare
    after = doc["to_reach_k"]
    assert after["records_below_k"] == 0 and after["suppressed"] <= 0.05 * 80
    assert after["generalization"]["age"] != "exact"
    bad = runner.invoke(app, ["site", "privacy-report", "--site-dir", str(site), "--quasi", "shoe_size"])
    assert bad.exit_code == 2 and "shoe_size" in bad.stderr


def test_site_budget_before_and_after_a_charge(tmp_path):
    from evoclone.federated.stores.ledger import SqlLedgerStore
    from evoclone.privacy.accounting import LedgerEntry
    from evoclone.site_node.settings import get_settings

    site = tmp_path / "s"
    assert runner.invoke(app, ["site", "init", "--site-dir", str(site), "--name", "s", "--epsilon", "2"]).exit_code == 0
    r = runner.invoke(app, ["site", "budget", "--site-dir", str(site), "--json"])
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["epsilon_spent"] == 0.0 and doc["epsilon_remaining"] == 2.0 and doc["charges"] == []
    store = SqlLedgerStore(url=get_settings(site).db_url)
    store.open(epsilon_budget=2.0, delta=1e-5)
    store.charge(LedgerEntry(run_id="9", round=1, noise_multiplier=3.0, sample_rate=0.05, steps=10))
    store.close()
    doc = json.loads(runner.invoke(app, ["site", "budget", "--site-dir", str(site), "--json"]).stdout)
    assert 0 < doc["epsilon_spent"] < 2.0 and doc["charges"][0]["run_id"] == "9"
    assert doc["epsilon_remaining"] == pytest.approx(2.0 - doc["epsilon_spent"], abs=1e-6)
    assert runner.invoke(app, ["site", "budget", "--site-dir", str(tmp_path / "nope")]).exit_code == 2

    reset = ["site", "reset-budget", "--site-dir", str(site), "--admin", "it-admin", "--reason", "new dataset"]
    r = runner.invoke(app, reset)
    assert r.exit_code == 2 and "--yes" in r.stderr  # nothing cleared without confirmation
    assert json.loads(runner.invoke(app, ["site", "budget", "--site-dir", str(site), "--json"]).stdout)["charges"]
    r = runner.invoke(app, [*reset[:-2], "--reason", " ", "--yes"])
    assert r.exit_code == 2
    r = runner.invoke(app, [*reset, "--yes", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["cleared_charges"] == 1
    doc = json.loads(runner.invoke(app, ["site", "budget", "--site-dir", str(site), "--json"]).stdout)
    assert doc["charges"] == [] and doc["epsilon_spent"] == 0.0
    store = SqlLedgerStore(url=get_settings(site).db_url)
    assert store.audit_log()[0]["admin"] == "it-admin"
    store.close()


def test_site_approve_revoke_and_app_hash(tmp_path):
    site = tmp_path / "s"
    assert runner.invoke(app, ["site", "init", "--site-dir", str(site), "--name", "s"]).exit_code == 0
    h = runner.invoke(app, ["app", "hash"]).stdout.strip()
    from evoclone.coordinator.superlink import fab_hash

    assert h == fab_hash() and len(h) == 64
    r = runner.invoke(app, ["site", "approve", h, "--site-dir", str(site), "--admin", "J Doe", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == {"fab_hash": h, "approved": True, "admin": "J Doe"}
    doc = json.loads(runner.invoke(app, ["site", "approvals", "--site-dir", str(site), "--json"]).stdout)
    assert [a["fab_hash"] for a in doc["approved"]] == [h]
    bad = runner.invoke(app, ["site", "approve", "1234", "--site-dir", str(site), "--admin", "J Doe"])
    assert bad.exit_code == 2 and "not a sha256" in bad.stderr
    assert runner.invoke(app, ["site", "revoke", h, "--site-dir", str(site), "--admin", "J Doe"]).exit_code == 0
    doc = json.loads(runner.invoke(app, ["site", "approvals", "--site-dir", str(site), "--json"]).stdout)
    assert doc["approved"] == [] and [d["action"] for d in doc["decisions"]] == ["approve", "revoke"]
    r = runner.invoke(app, ["site", "node", "--site-dir", str(site), "--superlink", "127.0.0.1:1"])
    assert r.exit_code == 2 and "--ca and --node-key" in r.stderr


def test_site_migrate_backs_up_then_reports_the_revision_and_version_flag(tmp_path):
    import sqlite3

    site = tmp_path / "site"
    assert runner.invoke(app, ["site", "init", "--site-dir", str(site), "--name", "s1"]).exit_code == 0
    assert runner.invoke(app, ["site", "stats", "--site-dir", str(site), "--json"]).exit_code == 0  # creates site.db
    backup = tmp_path / "backups" / "site-0.1.0.db"
    r = runner.invoke(app, ["site", "migrate", "--site-dir", str(site), "--backup", str(backup), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["to"] and doc["from"] == doc["to"] and doc["changed"] is False and doc["backup"] == str(backup)
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    with sqlite3.connect(backup) as db:  # a complete copy: the same schema revision as the live database
        assert db.execute("select version_num from alembic_version").fetchone()[0] == doc["to"]

    fresh = tmp_path / "fresh"
    assert runner.invoke(app, ["site", "init", "--site-dir", str(fresh), "--name", "s2"]).exit_code == 0
    r = runner.invoke(app, ["site", "migrate", "--site-dir", str(fresh), "--json"])
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["from"] is None and doc["to"] and doc["changed"] is True

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("evoclone ")


def test_site_migrate_seals_twins_stored_in_plaintext_before_encryption_at_rest(tmp_path):
    from datetime import datetime, timezone

    import sqlalchemy as sa
    from sqlmodel import Session, select

    from evoclone.federated.stores.engine import make_engine
    from evoclone.site_node.keyring import load_keyring
    from evoclone.site_node.migrate import upgrade
    from evoclone.site_node.review import views
    from evoclone.site_node.review_models import TwinReview

    site = tmp_path / "site"
    assert runner.invoke(app, ["site", "init", "--site-dir", str(site), "--name", "s1"]).exit_code == 0
    engine = make_engine(f"sqlite:///{site / 'site.db'}")
    upgrade(engine, "0003")  # a site database from before encryption, holding one twin in plaintext
    twin = {"events": [[30.0, "LDL", 2.5, "mmol/L"]], "outcome": {"time": 120.0, "event": False}}
    with engine.begin() as c:
        c.execute(sa.text(
            "INSERT INTO twin_review (study, pseudonym, model_version, arm, quality, copy_index, twin_json, status, "
            "note, annotations, created_at) VALUES ('s', :p, 'v1', 'control', 0.9, 0, :t, 'pending', '', '[]', :at)"),
            {"p": "P-" + "a" * 32, "t": json.dumps(twin), "at": datetime.now(timezone.utc)})
    r = runner.invoke(app, ["site", "migrate", "--site-dir", str(site), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["from"], doc["to"], doc["twins_sealed"]) == ("0003", "0004", 1)
    with engine.connect() as c:
        plain, sealed = c.execute(sa.text("SELECT twin_json, twin_sealed FROM twin_review")).one()
    assert plain is None and b"LDL" not in sealed
    with Session(engine) as session:
        (view,) = views(session=session, rows=list(session.exec(select(TwinReview)).all()),
                        keyring=load_keyring(site))
    assert view.events == twin["events"] and view.outcome == twin["outcome"]
    assert json.loads(runner.invoke(app, ["site", "migrate", "--site-dir", str(site), "--json"]).stdout
                      )["twins_sealed"] == 0
    engine.dispose()
