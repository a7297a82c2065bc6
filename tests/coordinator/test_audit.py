"""The audit trail: one event per request (never the body), and a chain that detects edits, removals, reorders."""

from __future__ import annotations

import json

import sqlalchemy as sa
from sqlmodel import Session, select

from evoclone.coordinator.audit import append_event, verify_chain, verify_stored_chain
from evoclone.coordinator.models import AuditEvent

from .conftest import add_user, enrol_payload


def _events(client) -> list[AuditEvent]:
    with Session(client.app.state.engine) as session:
        return list(session.exec(select(AuditEvent).order_by(AuditEvent.seq)).all())


def test_every_request_is_appended_without_its_body(pg_client, headers_for):
    client = pg_client
    admin = headers_for(client, "admin")
    before = len(_events(client))
    secret = "CANARY-PATIENT-0042"
    calls = [
        client.get("/health"),
        client.get("/api/v1/nowhere"),
        client.get("/api/v1/studies"),
        client.post("/api/v1/auth/token", data={"username": "admin-user", "password": secret}),
        client.post("/api/v1/sites/enrol", json={**enrol_payload("site-a"), "note": secret}),
        client.post("/api/v1/sites/enrol", json={"name": secret}),
        client.get("/api/v1/sites", headers=admin, params={"status": "pending"}),
    ]
    events = _events(client)[before:]
    http = [e for e in events if e.action.startswith("http.")]
    assert [e.detail["status"] for e in http] == [c.status_code for c in calls] == [200, 404, 401, 401, 202, 422, 200]
    assert [e.resource for e in http] == ["/health", "<unmatched>", "/api/v1/studies", "/api/v1/auth/token",
                                          "/api/v1/sites/enrol", "/api/v1/sites/enrol", "/api/v1/sites"]
    assert [e.outcome for e in http] == ["ok", "rejected", "denied", "denied", "ok", "rejected", "ok"]
    assert http[-1].actor == "admin-user" and http[-1].role == "admin"
    assert all(e.request_id for e in http)
    assert http[-1].request_id == calls[-1].headers["x-request-id"]
    domain = {e.action: e for e in events if not e.action.startswith("http.")}
    assert domain["auth.login"].outcome == "denied" and domain["site.enrol"].outcome == "pending"
    dumped = json.dumps([e.model_dump(mode="json") for e in events])
    assert secret not in dumped and "BEGIN CERTIFICATE REQUEST" not in dumped
    with Session(client.app.state.engine) as session:
        assert verify_stored_chain(session=session).ok
    r = client.get("/api/v1/audit/verify", headers=admin)
    assert r.json()["ok"] is True and r.json()["checked"] >= len(events)


def test_verify_detects_edit_removal_and_reorder(db_url, settings):
    from evoclone.coordinator.db import create_tables, make_engine

    engine = make_engine(settings.model_copy(update={"database_url": db_url}))
    create_tables(engine)
    with Session(engine) as session:
        for i in range(6):
            append_event(session=session, action="test", outcome="ok", actor=f"u{i}", detail={"i": i})
        session.commit()
        rows = [e.model_dump() for e in session.exec(select(AuditEvent).order_by(AuditEvent.seq)).all()]
        assert verify_chain(rows).ok and verify_chain(rows).checked == 6
        edited = [dict(r) for r in rows]
        edited[2]["detail"] = {"i": 99}
        assert verify_chain(edited).problem == "audit entry 3 was modified after it was written (hash mismatch)"
        assert not verify_chain(rows[:3] + rows[4:]).ok
        assert "entry 4 is missing or reordered" in verify_chain(rows[:3] + rows[4:]).problem
        assert not verify_chain(rows[1:]).ok  # the first entry removed
        swapped = rows[:2] + [rows[3], rows[2]] + rows[4:]
        assert not verify_chain(swapped).ok
        # reordering while renumbering (seq swapped too) breaks the links
        renumbered = [dict(r) for r in swapped]
        renumbered[2]["seq"], renumbered[3]["seq"] = 3, 4
        assert not verify_chain(renumbered).ok

        # tampering in the database itself
        session.execute(sa.update(AuditEvent).where(AuditEvent.seq == 4).values(actor="mallory"))
        session.commit()
        report = verify_stored_chain(session=session)
        assert not report.ok and report.seq == 4
        session.execute(sa.update(AuditEvent).where(AuditEvent.seq == 4).values(actor="u3"))
        session.commit()
        assert verify_stored_chain(session=session).ok
        session.execute(sa.delete(AuditEvent).where(AuditEvent.seq == 2))
        session.commit()
        report = verify_stored_chain(session=session)
        assert not report.ok and report.seq == 3 and "entry 2 is missing" in report.problem
    engine.dispose()


def test_auditor_reads_events(client, headers_for):
    auditor = headers_for(client, "auditor")
    add_user(client, "x", "sponsor")
    r = client.get("/api/v1/audit/events", headers=auditor, params={"limit": 2})
    assert r.status_code == 200 and [e["seq"] for e in r.json()] == [1, 2]
    assert all(len(e["hash"]) == 64 for e in r.json())
