"""The review workflow: queue filters, approve, reject with a reason (regenerated under its constraint), annotate,
one transaction per verdict and its log entry, twins sealed at rest, and the feedback file and per-round usage."""

from __future__ import annotations

import json

from sqlmodel import Session, select

from .conftest import MRN, NAME, PHONE
from .twin_model import coordinator_key, installed, model_dir  # noqa: F401 (fixtures)

R = {"reason": "review"}


def _queue(client, headers, patient, count=4):
    r = client.post(f"/api/v1/patients/{patient}/twins", params=R, headers=headers,
                    json={"arm": "treatment", "count": count, "study": "ascvd-1"})
    assert r.status_code == 200, r.text
    return [t["review_id"] for t in r.json()["twins"]]


def _rows(client):
    from evoclone.site_node.review_models import TwinReview

    with Session(client.app.state.engine) as session:
        return {r.id: r for r in session.exec(select(TwinReview)).all()}


def _log(client):
    from evoclone.site_node.access_log import list_entries

    with Session(client.app.state.engine) as session:
        return [e.action for e in list_entries(session=session, limit=10_000)]


def test_queue_approve_reject_regenerate_annotate_and_feedback(client, clinician, admin, patient, installed):
    ids = _queue(client, clinician, patient)
    assert len(ids) >= 2
    q = client.get("/api/v1/reviews", params={**R, "patient": patient, "study": "ascvd-1"}, headers=clinician).json()
    assert q["count"] == len(ids) and {i["status"] for i in q["items"]} == {"pending"}
    best = max(i["quality"] for i in q["items"])
    q = client.get("/api/v1/reviews", params={**R, "min_quality": best}, headers=clinician).json()
    assert q["count"] >= 1 and all(i["quality"] >= best for i in q["items"])
    assert client.get("/api/v1/reviews", params={**R, "study": "other"}, headers=clinician).json()["count"] == 0
    r = client.post(f"/api/v1/reviews/{ids[0]}/approve", params=R, headers=clinician)
    assert r.status_code == 200 and r.json()["review"]["status"] == "approved"
    assert client.post(f"/api/v1/reviews/{ids[0]}/approve", params=R, headers=clinician).status_code == 409
    text = f"Trajectory implausible; see {NAME} chart {MRN}, call {PHONE}"
    r = client.post(f"/api/v1/reviews/{ids[1]}/reject", params=R, headers=clinician,
                    json={"reason": "lab_out_of_range", "text": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["review"]["status"] == "rejected" and body["review"]["reason"] == "lab_out_of_range"
    assert MRN not in r.text and PHONE not in r.text and "[ID]" in body["review"]["note"]
    assert (body["regenerated"] is None) == (body["regeneration"] is not None)
    if body["regenerated"]:
        assert body["regenerated"]["parent_id"] == ids[1] and body["regenerated"]["status"] == "pending"
    r = client.post(f"/api/v1/reviews/{ids[1]}/reject", params=R, headers=clinician, json={"reason": "sloppy"})
    assert r.status_code == 422 and "implausible_trajectory" in r.json()["detail"]
    r = client.post(f"/api/v1/reviews/{ids[1]}/annotate", params=R, headers=clinician,
                    json={"text": f"second look, phone {PHONE}"})
    assert r.status_code == 200 and PHONE not in r.text and r.json()["annotations"][0]["by"] == "clinician-user"
    assert client.post("/api/v1/reviews/999999/approve", params=R, headers=clinician).status_code == 404
    assert client.get("/api/v1/reviews", headers=clinician).status_code == 422  # no reason
    rows = _rows(client)
    assert MRN not in json.dumps([r.model_dump(mode="json", exclude={"twin_sealed"}) for r in rows.values()])
    log = _log(client)
    assert log.count("review.approve") == 1 and log.count("review.reject") == 1 and "review.annotate" in log
    # at rest the twins are sealed: no event code, value or outcome in the database in plaintext
    raw = _raw_reviews(client)
    code = body["review"]["events"][0][1] if body["review"]["events"] else None
    assert raw and all(twin_json is None and sealed for twin_json, sealed in raw)
    if code:
        assert not any(code.encode() in sealed for _, sealed in raw)
    # feedback: every verdict goes to the file next to the snapshot; rounds record what they used
    assert client.get("/api/v1/reviews/feedback", headers=admin).json() == []
    r = client.post("/api/v1/reviews/feedback/export", headers=admin)
    assert r.status_code == 200 and r.json() == {"approved": 1, "rejected": 1, "path": "feedback.jsonl"}, r.text
    from evoclone.federated.feedback import read_feedback
    from evoclone.federated.stores.feedback import FeedbackUseStore

    site_dir = client.app.state.settings.site_dir
    assert (site_dir / "feedback.jsonl").stat().st_mode & 0o777 == 0o600
    verdicts = {v.review_id: v for v in read_feedback(site_dir / "feedback.jsonl")}
    assert {i: v.label for i, v in verdicts.items()} == {ids[0]: 1, ids[1]: -1}
    assert verdicts[ids[1]].reason == "lab_out_of_range" and verdicts[ids[0]].pseudonym == patient
    FeedbackUseStore(engine=client.app.state.engine).record(run_id="run-7", round=2, used=[ids[0]], held_out=[ids[1]])
    usage = client.get("/api/v1/reviews/feedback", headers=admin).json()
    assert usage == [{"run_id": "run-7", "round": 2, "approved": [ids[0]], "rejected": [ids[1]],
                      "approved_count": 1, "rejected_count": 1}]
    assert client.get("/api/v1/reviews/feedback", headers=clinician).status_code == 403


def _raw_reviews(client):
    import sqlalchemy as sa

    with client.app.state.engine.connect() as conn:
        return conn.execute(sa.text("SELECT twin_json, twin_sealed FROM twin_review")).all()


def test_a_crash_between_the_review_and_its_log_entry_leaves_nothing_half_written(client, clinician, patient,
                                                                                  installed, monkeypatch):
    ids = _queue(client, clinician, patient, count=2)
    before = _log(client)

    def crash(**_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("evoclone.site_node.review.append_access", crash)
    r = client.post(f"/api/v1/reviews/{ids[0]}/reject", params=R, headers=clinician,
                    json={"reason": "other", "text": "x"})
    assert r.status_code == 500 and "disk full" not in r.text
    r = client.post(f"/api/v1/reviews/{ids[0]}/approve", params=R, headers=clinician)
    assert r.status_code == 500
    row = _rows(client)[ids[0]]
    assert row.status == "pending" and row.reviewer is None and row.note == "" and row.reason is None
    assert _log(client) == before
    monkeypatch.undo()
    assert client.post(f"/api/v1/reviews/{ids[0]}/approve", params=R, headers=clinician).status_code == 200


def test_rejection_reasons_become_constraints(model_dir):
    from evoclone.federated.model_dir import load_generator
    from evoclone.federated.record import Event, Outcomes, PatientRecord
    from evoclone.site_node.inference import value_bins
    from evoclone.site_node.review import reason_constraints
    from evoclone.site_node.review_models import RejectReason

    _, tok, _ = load_generator(model_dir)
    code = next(iter(tok.value_ids))
    lo, hi = tok.codes[code].lo, tok.codes[code].hi
    patient = PatientRecord(patient_id="P-" + "1" * 32, site="s", baseline={}, arm=None,
                            events=(Event(time=-10.0, code=code, value=lo, unit=""),), outcomes=Outcomes())
    assert hi - lo > 2 * tok.codes[code].scale  # the vocabulary spans more than the allowed jump
    events = [[30.0, code, lo, ""], [60.0, code, hi, ""], [90.0, code, (lo + hi) / 2, ""]]
    c = reason_constraints(reason=RejectReason.lab_out_of_range, tok=tok, patient=patient, events=events)
    assert c.banned == {value_bins(tok, code, lo), value_bins(tok, code, hi)} and not c.first_value_banned
    c = reason_constraints(reason=RejectReason.contradicts_history, tok=tok, patient=patient, events=events)
    assert not c.banned and value_bins(tok, code, hi) in c.first_value_banned
    assert value_bins(tok, code, lo) not in c.first_value_banned
    both = reason_constraints(reason=RejectReason.implausible_trajectory, tok=tok, patient=patient, events=events)
    assert both.banned and both.first_value_banned
    none = reason_constraints(reason=RejectReason.wrong_dose_or_timing, tok=tok, patient=patient, events=events)
    assert not none.banned and not none.first_value_banned
