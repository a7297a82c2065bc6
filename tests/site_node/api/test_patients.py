"""GET /api/v1/patients/{pseudonym}: roles, the required reason, the access log, and no raw identifier anywhere."""

from __future__ import annotations

import logging

from sqlmodel import Session

from .conftest import MRN, NAME, PHONE, make_client


def _log(client):
    from evoclone.site_node.access_log import list_entries

    with Session(client.app.state.engine) as session:
        return [e.model_dump() for e in list_entries(session=session, limit=1000)]


def test_clinicians_and_admins_read_auditors_do_not(client, headers_for, patient):
    url = f"/api/v1/patients/{patient}"
    for role in ("clinician", "site_admin"):
        r = client.get(url, params={"reason": "treatment"}, headers=headers_for(client, role))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["pseudonym"] == patient and body["arm"] == "treatment" and body["n_events"] == 2
        assert body["outcomes"]["event"] is True and body["baseline"]["zip3"] == "021"
        assert set(body) == {"pseudonym", "site", "n_events", "arm", "baseline", "outcomes"}
        assert r.headers["cache-control"] == "no-store"
    r = client.get(url, params={"reason": "treatment"}, headers=headers_for(client, "auditor"))
    assert r.status_code == 403 and "auditor" in r.json()["detail"]
    assert [(e["actor"], e["role"], e["pseudonym"], e["reason"]) for e in _log(client)] == [
        ("clinician-user", "clinician", patient, "treatment"), ("site-admin-user", "site_admin", patient, "treatment")]


def test_every_read_is_logged_with_its_reason_on_sqlite_and_postgresql(pg_site, clock, headers_for):
    settings, patient = pg_site
    for client in make_client(settings, clock):
        clinician = headers_for(client, "clinician")
        url = f"/api/v1/patients/{patient}"
        assert client.get(url, params={"reason": "review"}, headers=clinician).status_code == 200
        assert client.get(url, headers={**clinician, "X-Access-Reason": "safety"}).status_code == 200
        r = client.get(url, headers=clinician)
        assert r.status_code == 422 and "reason" in r.json()["detail"] and "treatment" in r.json()["detail"]
        entries = _log(client)
        assert [(e["seq"], e["action"], e["reason"], e["outcome"]) for e in entries] == [
            (1, "patient.read", "review", "ok"), (2, "patient.read", "safety", "ok")]
        assert entries[0]["at"] is not None and entries[1]["prev_hash"] == entries[0]["hash"]
        r = client.get("/api/v1/audit/verify", headers=headers_for(client, "auditor"))
        assert r.status_code == 200 and r.json()["ok"] is True and r.json()["seq"] == 2


def test_unknown_and_malformed_pseudonyms(client, clinician):
    unknown = "P-" + "0" * 32
    r = client.get(f"/api/v1/patients/{unknown}", params={"reason": "review"}, headers=clinician)
    assert r.status_code == 404 and unknown not in r.text and "pseudonym" in r.json()["detail"]
    last = _log(client)[-1]
    assert last["outcome"] == "not_found" and last["pseudonym"] == "" and last["reason"] == "review"
    r = client.get(f"/api/v1/patients/{MRN}", params={"reason": "review"}, headers=clinician)
    assert r.status_code == 422 and MRN not in r.text
    r = client.get("/api/v1/patients/P-" + "a" * 32, params={"reason": MRN}, headers=clinician)
    assert r.status_code == 422 and MRN not in r.text
    assert len(_log(client)) == 1  # malformed requests never reach the data


def test_no_response_log_or_store_holds_a_raw_identifier(client, headers_for, patient, caplog, site_dir):
    caplog.set_level(logging.DEBUG)
    clinician, auditor = headers_for(client, "clinician"), headers_for(client, "auditor")
    answers = [client.get(f"/api/v1/patients/{patient}", params={"reason": "treatment"}, headers=clinician),
               client.get(f"/api/v1/patients/{MRN}", params={"reason": "treatment"}, headers=clinician),
               client.get(f"/api/v1/patients/{MRN}/../{MRN}", headers=clinician),
               client.get(f"/api/v1/nowhere/{MRN}", headers=clinician),
               client.get("/api/v1/audit/access-log", headers=auditor),
               client.get("/api/v1/audit/verify", headers=auditor),
               client.get("/metrics")]
    assert answers[0].status_code == 200 and answers[4].json()
    # the service's log lines (the test's own HTTP client logs the URLs it requests: not the service's)
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records if not r.name.startswith("httpx"))
    assert "GET /api/v1/patients/{pseudonym} 422" in logged
    text = "\n".join(r.text + str(dict(r.headers)) for r in answers) + logged
    for raw in (MRN, NAME, PHONE, "Zebulon"):
        assert raw not in text
        for path in site_dir.rglob("*"):
            if path.is_file():
                assert raw.encode() not in path.read_bytes(), path.name
