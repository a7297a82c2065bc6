"""`evoclone login|study|round` against a real `evoclone coordinator serve` process over HTTPS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from evoclone.cli.coordinator import coordinator_app
from evoclone.cli.main import app
from evoclone.federated.flower.runtime import free_port, http_ok

PASSWORD = "correct horse battery staple"
runner = CliRunner()


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """A served coordinator (API only) with an admin, a sponsor and two accepted sites."""
    from argon2 import PasswordHasher  # noqa: F401 (the server's real hashing; users are few)

    from tests.coordinator.conftest import enrol_payload

    d = tmp_path_factory.mktemp("coord") / "state"
    assert runner.invoke(coordinator_app, ["init", "--state-dir", str(d)]).exit_code == 0
    for user, role in (("root", "admin"), ("alice", "sponsor")):
        r = runner.invoke(coordinator_app, ["user", "add", "--state-dir", str(d), "--username", user, "--role", role,
                                            "--password-stdin"], input=PASSWORD + "\n")
        assert r.exit_code == 0, r.output
    port, ca = free_port(), d / "pki" / "ca.pem"
    base = f"https://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", "from evoclone.cli.coordinator import coordinator_app; "
                             "coordinator_app()", "serve", "--state-dir", str(d), "--port", str(port), "--no-superlink"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, delay = time.monotonic() + 60, 0.05
    while not http_ok(f"{base}/health", cafile=ca):
        assert proc.poll() is None and time.monotonic() < deadline, "coordinator did not come up"
        time.sleep(delay)  # polling the health endpoint, backing off
        delay = min(delay * 1.5, 0.5)
    with httpx.Client(base_url=base, verify=str(ca)) as c:
        token = c.post("/api/v1/auth/token", data={"username": "root", "password": PASSWORD}).json()["access_token"]
        for name in ("north", "south"):
            site = c.post("/api/v1/sites/enrol", json=enrol_payload(name)).json()
            assert c.post(f"/api/v1/sites/{site['id']}/accept", headers={"Authorization": f"Bearer {token}"}
                          ).status_code == 200
    yield base, ca
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCLONE_CONFIG", str(tmp_path / "cfg" / "coordinator.json"))
    for var in ("EVOCLONE_COORDINATOR_URL", "EVOCLONE_TOKEN", "EVOCLONE_COORDINATOR_CA"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "cfg" / "coordinator.json"


def _ok(args, **kw):
    r = runner.invoke(app, args, **kw)
    assert r.exit_code == 0, r.stderr
    return r


def test_sponsor_creates_a_study_and_launches_follows_and_stops_a_run(coordinator, env):
    base, ca = coordinator
    assert runner.invoke(app, ["study", "list"]).exit_code == 2  # nowhere to go yet
    bad = runner.invoke(app, ["login", "--url", base, "--username", "alice", "--ca", str(ca), "--password-stdin"],
                        input="wrong password\n")
    assert bad.exit_code == 2 and "401" in bad.stderr and not env.exists()
    _ok(["login", "--url", base, "--username", "alice", "--ca", str(ca), "--password-stdin"], input=PASSWORD + "\n")
    assert env.stat().st_mode & 0o777 == 0o600 and json.loads(env.read_text())["refresh_token"]
    r = runner.invoke(app, ["study", "create", "--name", "x", "--indication", "y", "--phase", "III", "--arms", "a,b",
                            "--endpoints", "os", "--sites", "north,nowhere"])
    assert r.exit_code == 2 and "unknown sites ['nowhere']" in r.stderr
    study = json.loads(_ok(["study", "create", "--name", "gbsg", "--indication", "breast cancer", "--phase", "III",
                            "--arms", "no,yes", "--endpoints", "rfs", "--sites", "north,south", "--epsilon", "2",
                            "--json"]).stdout)
    assert study["status"] == "draft" and study["target_epsilon"] == 2
    r = runner.invoke(app, ["round", "launch", "--study", str(study["id"]), "--covariates", "age,pnodes"])
    assert r.exit_code == 2 and "not active" in r.stderr
    _ok(["study", "activate", str(study["id"])])
    run = json.loads(_ok(["round", "launch", "--study", str(study["id"]), "--covariates", "age,pnodes", "--rounds",
                          "3", "--json"]).stdout)
    assert run["status"] == "pending" and run["config"]["covariates"] == ["age", "pnodes"]
    status = json.loads(_ok(["round", "status", str(run["id"]), "--json"]).stdout)
    assert status["rounds_done"] == 0 and status["status"] == "pending"
    _ok(["round", "stop", str(run["id"])])
    shown = json.loads(_ok(["study", "show", str(study["id"]), "--json"]).stdout)
    assert [r["status"] for r in shown["runs"]] == ["stopped"]
    listed = json.loads(_ok(["study", "list", "--json"]).stdout)
    assert [s["name"] for s in listed] == ["gbsg"]


def test_an_expired_access_token_is_refreshed_once(coordinator, env):
    base, ca = coordinator
    _ok(["login", "--url", base, "--username", "alice", "--ca", str(ca), "--password-stdin"], input=PASSWORD + "\n")
    doc = json.loads(env.read_text())
    env.write_text(json.dumps({**doc, "access_token": "expired.or.forged"}))
    _ok(["study", "list"])
    assert json.loads(env.read_text())["access_token"] != "expired.or.forged"  # rotated and kept
    env.write_text(json.dumps({**doc, "access_token": "x.y.z", "refresh_token": "used.or.forged"}))
    r = runner.invoke(app, ["study", "list"])
    assert r.exit_code == 2 and "evoclone login" in r.stderr


def test_model_list_show_canary_promote_and_rollback(coordinator, env, tmp_path):
    from tests.coordinator.test_registry import model_dir, upload

    base, ca = coordinator
    _ok(["login", "--url", base, "--username", "alice", "--ca", str(ca), "--password-stdin"], input=PASSWORD + "\n")
    study = json.loads(_ok(["study", "create", "--name", "registry", "--indication", "x", "--phase", "II", "--arms",
                            "control,treatment", "--endpoints", "os", "--sites", "north,south", "--json"]).stdout)["id"]
    _ok(["study", "activate", str(study)])
    token = json.loads(env.read_text())["access_token"]
    with httpx.Client(base_url=base, verify=str(ca)) as c:
        for seed in (1, 2):
            r = upload(c, {"Authorization": f"Bearer {token}"}, study, model_dir(tmp_path, seed, sites=("north",)))
            assert r.status_code == 201, r.text
    listed = json.loads(_ok(["model", "list", "--study", str(study), "--json"]).stdout)
    ids = sorted(m["id"] for m in listed)
    assert ids == [f"s{study}-v1", f"s{study}-v2"] and {m["status"] for m in listed} == {"registered"}
    shown = json.loads(_ok(["model", "show", ids[0], "--json"]).stdout)
    assert shown["signature"] and "north" in shown["lineage"]["sites"]
    _ok(["model", "promote", ids[0]])
    r = runner.invoke(app, ["model", "canary", ids[1], "--sites", "nowhere"])
    assert r.exit_code == 2
    _ok(["model", "canary", ids[1], "--sites", "north", "--margin", "0.05"])
    assert "waiting for reports" in _ok(["model", "show", ids[1]]).stderr
    _ok(["model", "rollback", ids[1]])
    status = {m["id"]: m["status"] for m in json.loads(_ok(["model", "list", "--json"]).stdout)}
    assert status[ids[0]] == "promoted" and status[ids[1]] == "rolled_back"
    r = runner.invoke(app, ["model", "promote", ids[1]])
    assert r.exit_code == 2 and "409" in r.stderr


def test_site_reports_drift_and_compliance_to_the_served_coordinator(coordinator, env, tmp_path, monkeypatch):
    """A site seals its reference, registers its key and sends signed drift and compliance reports."""
    from evoclone.federated.simulator import cohort_records, simulate_cohort
    from evoclone.site_node.drift import create_reference
    from evoclone.site_node.pipeline import open_store
    from evoclone.site_node.settings import get_settings, init_site

    base, ca = coordinator
    site_dir = tmp_path / "north"
    init_site(site_dir, name="north")  # the enrolled site's own node
    records = cohort_records(simulate_cohort(patients=120, sites=1, seed=5))
    settings = get_settings(site_dir)
    site_json = site_dir / "site.json"
    doc = json.loads(site_json.read_text())
    doc.update(coordinator_url=base, tls_ca_cert=str(ca))
    site_json.write_text(json.dumps(doc))
    store = open_store(settings)
    store.upsert_records(records=records)
    store.close()
    create_reference(site_dir=site_dir, records=records)
    with httpx.Client(base_url=base, verify=str(ca)) as c:  # the coordinator's admin issues the site a token
        admin = {"Authorization": "Bearer " + c.post("/api/v1/auth/token", data={"username": "root", "password":
                                                                                  PASSWORD}).json()["access_token"]}
        north = next(s for s in c.get("/api/v1/sites", headers=admin).json() if s["name"] == "north")
        token = c.post(f"/api/v1/sites/{north['id']}/tokens", headers=admin, json={}).json()
    monkeypatch.setenv("EVOCLONE_SITE_TOKEN", token["token"])
    dry = runner.invoke(app, ["site", "report", "drift", "--site-dir", str(site_dir), "--dry-run"])
    assert dry.exit_code == 0, dry.stderr
    assert json.loads(dry.stdout)["kind"] == "drift_report" and "MRN" not in dry.stdout
    r = runner.invoke(app, ["site", "report", "drift", "--site-dir", str(site_dir)])
    assert r.exit_code == 2 and "refused" in r.stderr  # no key registered yet: a signed report cannot be checked
    _ok(["site", "report", "key", "--site-dir", str(site_dir)])
    _ok(["site", "report", "drift", "--site-dir", str(site_dir)])
    r = runner.invoke(app, ["site", "report", "compliance", "--site-dir", str(site_dir)])
    assert r.exit_code == 0 and "compliance self-check sent" in r.stderr, r.stderr
