"""Site reports at the coordinator: report keys, drift intake over time with retraining requests, signed
compliance self-checks, and the audit report (API and `evoclone audit|drift report`)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, select
from typer.testing import CliRunner

from evoclone.coordinator.models import AuditEvent
from evoclone.coordinator.report_models import ComplianceCheck
from evoclone.federated.record import PatientRecord
from evoclone.site_node import compliance, drift
from evoclone.site_node.settings import get_settings, init_site

from .conftest import active_site


def cohort_pair() -> tuple[list[PatientRecord], list[PatientRecord]]:
    """A reference hospital's anonymized records and another hospital's (shifted) ones."""
    from evoclone.federated.simulator import cohort_records, simulate_cohort

    recs = cohort_records(simulate_cohort(patients=400, sites=2, seed=3))
    first = recs[0].site
    return [r for r in recs if r.site == first], [r for r in recs if r.site != first]


@pytest.fixture(scope="module")
def records():
    """Two hospitals' records (simulated once per module)."""
    return cohort_pair()


def older(recs: list[PatientRecord], years: float) -> list[PatientRecord]:
    """The same patients, `years` older at baseline (a drift of age)."""
    return [r.model_copy(update={"baseline": {**r.baseline, "age": r.baseline["age"] + years}}) for r in recs]


def new_site(tmp_path: Path, name: str, reference: list[PatientRecord]) -> Path:
    """An initialised site directory holding a drift reference taken from `reference`."""
    d = tmp_path / name
    init_site(d, name=name)
    drift.create_reference(site_dir=d, records=reference)
    return d


def site_token(client: TestClient, admin: dict, site_id: int) -> str:
    """A fresh API token of an active site."""
    r = client.post(f"/api/v1/sites/{site_id}/tokens", headers=admin)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def send(client: TestClient, payload, token: str, path: str, method: str = "POST"):
    """Send a payload the way a site does (its exact JSON, with its token)."""
    return compliance.post_payload(payload, http=client, path=path, token=token, method=method)


def enrol_reporting_site(client: TestClient, admin: dict, site_dir: Path) -> tuple[int, str]:
    """Accept the site, issue its token and register its report key; (site id, token)."""
    name = get_settings(site_dir).name
    site_id = active_site(client, admin, name)
    token = site_token(client, admin, site_id)
    r = send(client, compliance.key_registration(site_dir=site_dir), token, "/api/v1/reports/key", "PUT")
    assert r.status_code == 200, r.text
    return site_id, token


def events(client: TestClient, action: str) -> list[AuditEvent]:
    """Audit events of one action, oldest first."""
    with Session(client.app.state.engine) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).all())


def test_drift_reports_over_time_flag_features_and_request_retraining_once(pg_client, headers_for, tmp_path, records):
    client = pg_client
    admin, sponsor, auditor = (headers_for(client, r) for r in ("admin", "sponsor", "auditor"))
    site_dir = new_site(tmp_path, "st-mary", records[0])
    site_id, token = enrol_reporting_site(client, admin, site_dir)
    body = {"name": "trial-1", "indication": "CKD", "phase": "III", "arms": ["control", "treatment"],
            "endpoints": ["os"], "target_epsilon": 3.0, "target_delta": 1e-5, "site_ids": [site_id]}
    study = client.post("/api/v1/studies", json=body, headers=sponsor).json()["id"]
    assert client.patch(f"/api/v1/studies/{study}", json={"status": "active"}, headers=sponsor).status_code == 200
    hooked = []
    client.app.state.on_retrain = hooked.append

    r = send(client, drift.drift_report(site_dir=site_dir, records=records[0]), token, "/api/v1/reports/drift")
    assert r.status_code == 201 and r.json()["flagged"] == [] and r.json()["retrain_requests"] == []
    r = send(client, drift.drift_report(site_dir=site_dir, records=older(records[0], 12)), token,
              "/api/v1/reports/drift")
    assert r.status_code == 201, r.text
    report = r.json()
    assert "age" in report["flagged"] and report["signed"] and len(report["retrain_requests"]) == 1
    assert [h.id for h in hooked] == report["retrain_requests"] and hooked[0].study_id == study
    again = send(client, drift.drift_report(site_dir=site_dir, records=older(records[0], 15)), token,
                 "/api/v1/reports/drift").json()
    assert again["retrain_requests"] == []  # one open request per study is enough

    series = client.get("/api/v1/drift", params={"site": "st-mary", "feature": "age"}, headers=auditor).json()
    assert [round(x["psi"] or 0, 3) == 0 for x in series] == [True, False, False]
    assert [x["flagged"] for x in series] == [False, True, True] and series[1]["flags"] == ["psi"]
    assert series[0]["received_at"] <= series[1]["received_at"] <= series[2]["received_at"]
    assert len(client.get("/api/v1/drift", params={"flagged": "true"}, headers=sponsor).json()) >= 2
    listed = client.get("/api/v1/drift/reports", params={"site": "st-mary"}, headers=auditor).json()
    assert [x["retrain_requests"] for x in listed] == [[], report["retrain_requests"], []]
    reqs = client.get("/api/v1/drift/retrain", params={"study": study}, headers=auditor).json()
    assert [(q["status"], q["report_id"]) for q in reqs] == [("requested", report["id"])]
    assert [e.outcome for e in events(client, "drift.retrain")] == ["requested"]

    rid = reqs[0]["id"]
    url = f"/api/v1/drift/retrain/{rid}"
    assert client.patch(url, json={"status": "launched"}, headers=sponsor).status_code == 422  # names no run
    assert client.patch(url, json={"status": "dismissed"}, headers=auditor).status_code == 403
    r = client.patch(url, json={"status": "dismissed"}, headers=sponsor)
    assert r.status_code == 200 and r.json()["status"] == "dismissed"
    assert client.patch(url, json={"status": "dismissed"}, headers=sponsor).status_code == 409
    third = send(client, drift.drift_report(site_dir=site_dir, records=older(records[0], 15), study_id=study), token,
                 "/api/v1/reports/drift").json()
    assert len(third["retrain_requests"]) == 1 and len(hooked) == 2

    # reading is for users, reporting for sites
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/drift", headers=bearer).status_code == 401
    assert client.post("/api/v1/reports/drift", content=b"{}", headers=auditor).status_code == 401
    assert client.get("/api/v1/drift", params={"site": "../x"}, headers=auditor).status_code == 422


def test_signatures_keys_and_site_identity_are_enforced(client, headers_for, tmp_path, records):
    admin = headers_for(client, "admin")
    site_dir = new_site(tmp_path, "site-a", records[0])
    site_id, token = enrol_reporting_site(client, admin, site_dir)
    other = new_site(tmp_path, "site-b", records[1])  # its own report key, never registered for site-a
    r = send(client, compliance.key_registration(site_dir=other).model_copy(update={"site": "site-a"}), token,
             "/api/v1/reports/key", "PUT")
    assert r.status_code == 409 and "DELETE /api/v1/sites/" in r.json()["detail"]
    report = drift.drift_report(site_dir=site_dir, records=records[1])
    cases = {
        "unsigned": report.model_copy(update={"signature": None}),
        "bad_signature": report.model_copy(update={"current_count": report.current_count + 10}),
        "unknown_key": drift.drift_report(site_dir=other, records=records[1]).model_copy(update={"site": "site-a"}),
        "site_mismatch": drift.drift_report(site_dir=other, records=records[1]),
    }
    for reason, payload in cases.items():
        r = send(client, payload, token, "/api/v1/reports/drift")
        assert r.status_code == 422 and "payload refused" in r.json()["detail"], (reason, r.text)
    assert [e.detail["reason"] for e in events(client, "egress.reject")] == list(cases)
    assert send(client, report, token, "/api/v1/reports/drift").status_code == 201

    # an admin unpins a lost key; the site then registers its new one
    key_url = f"/api/v1/sites/{site_id}/report-key"
    assert client.delete(key_url, headers=headers_for(client, "sponsor")).status_code == 403
    assert client.delete(key_url, headers=admin).status_code == 200
    (site_dir / compliance.REPORT_KEY_FILE).unlink()
    assert send(client, compliance.key_registration(site_dir=site_dir), token, "/api/v1/reports/key",
                "PUT").status_code == 200
    pinned = client.get(key_url, headers=admin).json()["fingerprint"]
    assert pinned == compliance.key_fingerprint(compliance.report_key(site_dir))
    r = send(client, compliance.self_check(site_dir=site_dir), token, "/api/v1/reports/compliance")
    assert r.status_code == 201

    # a revoked token, or none, reports nothing
    tokens = client.get(f"/api/v1/sites/{site_id}/tokens", headers=admin).json()
    client.post(f"/api/v1/sites/{site_id}/tokens/{tokens[0]['id']}/revoke", headers=admin)
    assert send(client, report, token, "/api/v1/reports/drift").status_code == 401
    assert client.post("/api/v1/reports/compliance", content=report.model_dump_json()).status_code == 401


def _good_site(site_dir: Path, tmp_path: Path) -> None:
    """Configure TLS, retention and an approved app, so every check passes."""
    from evoclone.privacy.pki import new_ca
    from evoclone.site_node.approvals import ApprovalStore

    (tmp_path / "ca.pem").write_bytes(new_ca("study CA")[1])
    path = site_dir / "site.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "retention_days": 730,
                                "coordinator_url": "https://coord:8443", "tls_ca_cert": str(tmp_path / "ca.pem")}))
    get_settings.cache_clear()
    store = ApprovalStore(url=get_settings(site_dir).db_url)
    store.approve("cd" * 32, admin="dpo")
    store.close()


def test_compliance_self_checks_become_an_audit_report(pg_client, pg_settings, headers_for, tmp_path, records):
    from evoclone.coordinator.compliance import build_audit_report

    client = pg_client
    admin, auditor, sponsor = (headers_for(client, r) for r in ("admin", "auditor", "sponsor"))
    good, bare = new_site(tmp_path, "good", records[0]), new_site(tmp_path, "bare", records[1])
    _good_site(good, tmp_path)
    for d in (good, bare):
        _, token = enrol_reporting_site(client, admin, d)
        r = send(client, compliance.self_check(site_dir=d), token, "/api/v1/reports/compliance")
        assert r.status_code == 201, r.text
    active_site(client, admin, "silent")  # never reports
    listed = client.get("/api/v1/reports/compliance", headers=auditor).json()
    assert [(c["site"], c["passed"]) for c in listed] == [("bare", False), ("good", True)]
    assert client.get("/api/v1/reports/compliance", headers=sponsor).status_code == 403

    doc = client.get("/api/v1/audit/compliance", headers=auditor).json()
    reqs = {r["ref"]: r for r in doc["requirements"]}
    assert {r["framework"] for r in doc["requirements"]} == {"HIPAA Security Rule", "GDPR", "FDA 21 CFR Part 11"}
    for ref in ("164.312(a)(2)(iv)", "164.312(b)", "164.312(e)(1)", "164.308(a)(1)(ii)(B)", "Art. 5(1)(e)",
                "Art. 25", "Art. 30", "Art. 32", "11.10(d)", "11.10(e)", "11.50", "11.70"):
        assert ref in reqs
    tls = reqs["164.312(e)(1)"]
    assert tls["status"] == "not_met" and "bare: not_configured" in tls["evidence"][0]["detail"]
    assert "silent: missing self-check" in tls["evidence"][0]["detail"]
    assert reqs["11.70"]["status"] == "met" and reqs["11.10(e)"]["status"] == "no_evidence"  # silent site
    states = {s["site"]: (s["state"], s["signature_valid"]) for s in doc["sites"]}
    assert states == {"bare": ("current", True), "good": ("current", True), "silent": ("missing", None)}
    html = client.get("/api/v1/audit/compliance", params={"format": "html"}, headers=auditor)
    assert html.headers["content-type"].startswith("text/html") and "164.312(a)(2)(iv)" in html.text
    assert client.get("/api/v1/audit/compliance", headers=sponsor).status_code == 403

    engine = client.app.state.engine
    with Session(engine) as s:
        later = datetime.now(timezone.utc) + timedelta(days=40)
        stale = build_audit_report(session=s, settings=pg_settings, now=later)
    assert {x.state for x in stale.sites} == {"stale", "missing"}
    assert {r.status for r in stale.requirements if r.ref == "164.312(a)(2)(iv)"} == {"no_evidence"}
    with Session(engine) as s:  # a stored self-check edited afterwards no longer verifies
        row = s.exec(select(ComplianceCheck).where(ComplianceCheck.site == "bare")).one()
        row.document = {**row.document, "retention_days": 3650}
        s.add(row)
        s.commit()
    doc = client.get("/api/v1/audit/compliance", headers=auditor).json()
    assert {s["site"]: s["signature_valid"] for s in doc["sites"]}["bare"] is False
    assert {r["ref"]: r["status"] for r in doc["requirements"]}["11.70"] == "not_met"


def test_audit_and_drift_commands(client, settings, headers_for, tmp_path, records, monkeypatch):
    import typer

    from evoclone.cli.audit import audit_app as audit_cmds
    from evoclone.cli.audit import drift_app as drift_cmds

    audit_app, drift_app = typer.Typer(), typer.Typer()  # registered as in `evoclone audit|drift ...`
    audit_app.add_typer(audit_cmds, name="audit")
    drift_app.add_typer(drift_cmds, name="drift")
    admin, auditor = headers_for(client, "admin"), headers_for(client, "auditor")
    site_dir = new_site(tmp_path, "site-a", records[0])
    _, token = enrol_reporting_site(client, admin, site_dir)
    send(client, compliance.self_check(site_dir=site_dir), token, "/api/v1/reports/compliance")
    send(client, drift.drift_report(site_dir=site_dir, records=older(records[0], 12)), token, "/api/v1/reports/drift")
    runner, state = CliRunner(), str(settings.state_dir)

    r = runner.invoke(audit_app, ["audit", "report", "--state-dir", state, "--format", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["summary"]["sites"] == 1 and doc["sites"][0]["site"] == "site-a"
    out = tmp_path / "audit.html"
    r = runner.invoke(audit_app, ["audit", "report", "--state-dir", state, "--format", "html", "--out", str(out)])
    assert r.exit_code == 0 and "11.10(e)" in out.read_text() and "<script" not in out.read_text()
    assert runner.invoke(audit_app, ["audit", "report", "--state-dir", state, "--format", "pdf"]).exit_code == 2
    assert runner.invoke(audit_app, ["audit", "report", "--state-dir", str(tmp_path / "nowhere")]).exit_code == 2

    r = runner.invoke(drift_app, ["drift", "report", "--state-dir", state, "--feature", "age", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["drift"]
    assert [(x["site"], x["feature"], x["flagged"]) for x in rows] == [("site-a", "age", True)]
    r = runner.invoke(drift_app, ["drift", "report", "--state-dir", state, "--flagged"])
    assert r.exit_code == 0 and "age" in r.stdout

    # without --state-dir the commands ask the API with the login session
    monkeypatch.setenv("EVOCLONE_COORDINATOR_URL", "http://coordinator.test")
    monkeypatch.setenv("EVOCLONE_TOKEN", "unused")
    monkeypatch.setattr("evoclone.cli.client.Coordinator.request",
                        lambda self, method, path, **kw: client.request(method, path, headers=auditor, **kw).json())
    r = runner.invoke(audit_app, ["audit", "report", "--format", "json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["summary"]["sites"] == 1
    r = runner.invoke(drift_app, ["drift", "report", "--site", "site-a", "--json"])
    assert r.exit_code == 0 and {x["feature"] for x in json.loads(r.stdout)["drift"]} >= {"age", "sex"}
    with sa.create_engine(settings.db_url).connect() as conn:  # what the commands read is what the API stored
        assert conn.execute(sa.text("SELECT count(*) FROM drift_report")).scalar() == 1
