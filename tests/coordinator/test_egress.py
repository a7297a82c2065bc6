"""The egress guard: only typed aggregate payloads get in; anything else is refused without echoing it, and
audited; a canary identifier planted in a site's data never reaches the coordinator's API, store, logs or files."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from evoclone.coordinator.egress import EgressRejected, check_payload
from evoclone.federated.payloads import ComplianceSelfCheck, DriftReport
from evoclone.site_node import compliance, drift
from evoclone.site_node.pipeline import export_snapshot, open_store
from evoclone.site_node.settings import get_settings

from .test_reports import cohort_pair, enrol_reporting_site, events, older, send

CANARY_MRN = "MRN-CANARY-7731"
CANARY_NAME = "Zebulon Canarywood"
CANARY_BITS = ("CANARY-7731", "Canarywood", "Zebulon")
NOW = "2026-01-01T00:00:00Z"


def drift_doc(**kw) -> dict:
    """A valid drift report's JSON document, with `kw` replacing fields."""
    doc = {"site": "site-a", "sent_at": NOW, "kind": "drift_report", "reference_id": "ab" * 16,
           "reference_count": 200, "current_count": 200,
           "features": [{"name": "age", "kind": "numeric", "psi": 0.3, "ks": 0.2, "mmd": 0.01, "cells": 10},
                        {"name": "lab:4548-4", "kind": "numeric", "psi": 0.01}],
           "outcomes": [{"name": "binary", "reference": 0.3, "current": 0.32}]}
    return {**doc, **kw}


def self_check_doc(**kw) -> dict:
    """A valid (unsigned-looking) compliance self-check document."""
    checks = [{"id": i, "passed": True, "reason": "ok"} for i in ("encryption_at_rest", "transport_tls",
                                                                  "privacy_budget", "audit_chain", "retention",
                                                                  "approved_apps")]
    doc = {"site": "site-a", "sent_at": NOW, "checks": checks, "approved_apps": ["ab" * 32] * 12,
           "key_fingerprint": "a" * 64, "signature": "b" * 128}
    return {**doc, **kw}


def _feature(name: str, **kw) -> dict:
    return {"name": name, "kind": "numeric", **kw}


CASES = [  # (document, reason, where): each must be refused for that reason at that place
    (drift_doc(patient_mrn="x"), "identifier", "<unexpected field>"),
    (drift_doc(notes="free text"), "schema", "<unexpected field>"),
    (drift_doc(features=[_feature("age", rows=[1, 2, 3])]), "schema", "features.0.<unexpected field>"),
    (drift_doc(features=[_feature(CANARY_MRN)]), "identifier", "features.name"),
    (drift_doc(features=[_feature("contact", note="jane.doe@example.org")]), "identifier",
     "features.<unexpected field>"),
    (drift_doc(features=[_feature("age")], reference_id="123-45-6789"), "identifier", "reference_id"),
    (drift_doc(features=[_feature("born 1961-04-12")]), "identifier", "features.name"),
    (drift_doc(features=[_feature("age", psi="0.3")]), "schema", "features.0.psi"),
    (drift_doc(features=[_feature("age", psi=True)]), "schema", "features.0.psi"),
    (drift_doc(current_count=203), "schema", "current_count"),
    (drift_doc(features=[_feature(f"f{i}") for i in range(513)]), "oversized_list", "features"),
    (drift_doc(features=[[CANARY_NAME, 61.2], ["Ann Other", 57.0]]), "per_row_array", "features"),
    (drift_doc(ages=[61.2, 57.0, 70.1, 44.0, 38.5, 66.6, 71.2, 59.9, 48.3, 52.0]), "per_row_array",
     "<unexpected field>"),
    (drift_doc(reference_count=20, current_count=20, features=[_feature(f"f{i}") for i in range(20)]),
     "cohort_shaped_list", "features"),
    (drift_doc(x={"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}), "too_deep", "<unexpected field>"),
    (drift_doc(site=CANARY_NAME), "site_mismatch", "site"),
    (self_check_doc(checks=self_check_doc()["checks"][:5] + [{"id": "retention", "passed": True,
                                                             "reason": CANARY_NAME}]), "schema", "checks.5.reason"),
    (self_check_doc(signature=CANARY_MRN), "identifier", "signature"),
]


@pytest.mark.parametrize("doc,reason,where", CASES)
def test_the_guard_refuses_with_a_reason_that_never_echoes_the_payload(doc, reason, where):
    model = ComplianceSelfCheck if "checks" in doc else DriftReport
    raw = json.dumps(doc).encode()
    with pytest.raises(EgressRejected) as info:
        check_payload(raw, model, site="site-a")
    exc = info.value
    assert (exc.reason, exc.where) == (reason, where), str(exc)
    message = str(exc)
    assert "\n" not in message and message.startswith("payload refused:")
    for value in (CANARY_MRN, CANARY_NAME, "jane.doe", "123-45-6789", "1961", "free text", "61.2", "patient_mrn"):
        assert value not in message


def test_the_guard_lets_valid_payloads_through():
    report = check_payload(json.dumps(drift_doc()).encode(), DriftReport, site="site-a")
    assert report.features[0].name == "age" and report.sent_at == datetime(2026, 1, 1, tzinfo=timezone.utc)
    check = check_payload(json.dumps(self_check_doc()).encode(), ComplianceSelfCheck, site="site-a")
    assert len(check.approved_apps) == 12  # a declared list of hashes is not a list of rows
    for raw in (b"", b"[]", b"not json", b'{"site": "site-a"'):
        with pytest.raises(EgressRejected, match="not a JSON object"):
            check_payload(raw, DriftReport, site="site-a")


@pytest.fixture(scope="module")
def records():
    """Two hospitals' records (simulated once per module)."""
    return cohort_pair()


def _plant(records):
    """Every patient gets a name and identifier-like columns; one patient carries the canary everywhere."""
    planted = []
    for i, r in enumerate(records):
        baseline = {**r.baseline, "given_name": f"Patient {i}", CANARY_MRN: 1.0, CANARY_NAME: 2.0,
                    "mrn": f"MRN-{i:06d}"}
        update = {"baseline": baseline}
        if i == 0:
            baseline.update(given_name=CANARY_NAME, mrn=CANARY_MRN)
            update["patient_id"] = CANARY_MRN
            update["events"] = (*r.events, r.events[0].model_copy(update={"code": CANARY_MRN}))
        planted.append(r.model_copy(update=update))
    return planted


def _dump_database(engine: sa.Engine) -> str:
    parts = []
    with engine.connect() as conn:
        for table in sa.inspect(engine).get_table_names():
            for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                parts.append(repr(tuple(row)))
    return "\n".join(parts)


def test_a_canary_in_a_sites_data_never_reaches_the_coordinator(pg_client, pg_settings, headers_for, tmp_path,
                                                                 records, caplog):
    caplog.set_level(logging.DEBUG)
    client = pg_client
    admin, auditor, sponsor = (headers_for(client, r) for r in ("admin", "auditor", "sponsor"))
    from evoclone.site_node.settings import init_site

    site_dir = tmp_path / "site-a"
    init_site(site_dir, name="site-a")
    settings = get_settings(site_dir)
    planted = _plant(records[0])
    store = open_store(settings)
    store.upsert_records(records=planted)
    store.close()
    export_snapshot(site_dir=site_dir)
    drift.create_reference(site_dir=site_dir)  # from the training snapshot
    store = open_store(settings)
    store.upsert_records(records=older(planted, 10))  # the site's data today
    store.close()
    assert any(CANARY_MRN in r.model_dump_json() for r in open_store(settings).records())

    site_id, token = enrol_reporting_site(client, admin, site_dir)
    responses = []
    report = drift.drift_report(site_dir=site_dir)
    assert report.features_withheld == 3 and "given_name" in {f.name for f in report.features}
    for payload, path in ((report, "/api/v1/reports/drift"),
                          (compliance.self_check(site_dir=site_dir), "/api/v1/reports/compliance")):
        r = send(client, payload, token, path)
        assert r.status_code == 201, r.text
        responses.append(r.text)

    bearer = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    good = json.loads(report.model_dump_json())
    malicious = [
        ("/api/v1/reports/drift", {**good, "patient": {"mrn": CANARY_MRN, "name": CANARY_NAME}}),
        ("/api/v1/reports/drift", {**good, CANARY_MRN: CANARY_NAME}),
        ("/api/v1/reports/drift", {**good, "features": [{**good["features"][0], "name": CANARY_MRN}]}),
        ("/api/v1/reports/drift", {**good, "features": [[CANARY_MRN, CANARY_NAME, 61.0]] * 200}),
        ("/api/v1/reports/drift", {**good, "site": CANARY_NAME}),
        ("/api/v1/reports/drift", {**good, "features": [{**good["features"][0], "name": CANARY_NAME}]}),
        ("/api/v1/reports/compliance", {**json.loads(compliance.self_check(site_dir=site_dir).model_dump_json()),
                                        "approved_apps": [CANARY_MRN]}),
        ("/api/v1/reports/key", {"site": "site-a", "sent_at": NOW, "kind": "report_key", "public_key": CANARY_MRN}),
    ]
    for path, doc in malicious:
        method = "PUT" if path.endswith("/key") else "POST"
        r = client.request(method, path, content=json.dumps(doc).encode(), headers=bearer)
        assert r.status_code == 422, (path, r.text)
        responses.append(r.text)
    r = client.post("/api/v1/reports/drift", content=f"{CANARY_MRN},{CANARY_NAME}\n".encode(), headers=bearer)
    assert r.status_code == 422
    responses.append(r.text)
    rejected = events(client, "egress.reject")
    assert len(rejected) == len(malicious) + 1 and all(e.actor == "site:site-a" for e in rejected)

    # everything anyone can read afterwards
    for path, who in (("/api/v1/drift", auditor), ("/api/v1/drift/reports", sponsor),
                      ("/api/v1/drift/retrain", auditor),
                      ("/api/v1/reports/compliance", auditor), ("/api/v1/audit/compliance", auditor),
                      ("/api/v1/audit/compliance?format=html", auditor), ("/api/v1/audit/events?limit=1000", auditor),
                      (f"/api/v1/sites/{site_id}/report-key", admin), ("/api/v1/sites", admin),
                      (f"/api/v1/drift?feature={CANARY_MRN}", auditor), ("/metrics", auditor)):
        r = client.get(path, headers=who)
        assert r.status_code == 200, (path, r.text)
        responses.append(r.text)
    places = {"API responses": "\n".join(responses), "database": _dump_database(client.app.state.engine),
              # the service's own log records (the test client's request log is the sender's, not the coordinator's)
              "logs": "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
                                if not r.name.startswith("httpx"))}
    for f in sorted(pg_settings.state_dir.rglob("*")):  # the objects directory, and the SQLite files when used
        if f.is_file():
            places[str(f)] = f.read_bytes().decode("latin-1")
    assert len(places["database"]) > 1000 and "given_name" in places["database"]
    assert "egress.reject" in places["database"]
    assert places["logs"].count("egress guard refused") == len(rejected)  # the logs were captured
    for where, text in places.items():
        for bit in CANARY_BITS:
            assert bit not in text, f"the canary ({bit}) reached {where}"
