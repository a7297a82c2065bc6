"""Runs: launch, stop and status through the API, and the dispatcher driving a real SuperLink."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from sqlmodel import Session

from .conftest import active_site

CONFIG = {"endpoint": "time_to_event", "covariates": ["age", "pnodes"], "batch_size": 16}


def _study(client, headers, names=("north", "south"), activate=True) -> int:
    admin = headers(client, "admin")
    ids = [active_site(client, admin, n) for n in names]
    r = client.post("/api/v1/studies", headers=headers(client, "sponsor"), json={
        "name": "gbsg", "indication": "breast cancer", "phase": "III", "arms": ["no", "yes"],
        "endpoints": ["recurrence-free survival"], "target_epsilon": 3.0, "target_delta": 1e-5, "site_ids": ids})
    assert r.status_code == 201, r.text
    study = r.json()["id"]
    if activate:
        r = client.patch(f"/api/v1/studies/{study}", headers=headers(client, "sponsor"), json={"status": "active"})
        assert r.status_code == 200, r.text
    return study


def test_launch_queue_stop_and_status(pg_client, headers_for):
    client, sponsor = pg_client, headers_for(pg_client, "sponsor")
    draft = _study(client, headers_for, activate=False)
    r = client.post(f"/api/v1/studies/{draft}/runs", headers=sponsor, json={"rounds": 3, "config": CONFIG})
    assert r.status_code == 409 and "not active" in r.json()["detail"]
    client.patch(f"/api/v1/studies/{draft}", headers=sponsor, json={"status": "active"})
    bad = client.post(f"/api/v1/studies/{draft}/runs", headers=sponsor,
                      json={"rounds": 3, "config": {**CONFIG, "target_epsilon": 50}})
    assert bad.status_code == 422  # privacy comes from the study, never from a run
    auditor = headers_for(client, "auditor")
    assert client.post(f"/api/v1/studies/{draft}/runs", headers=auditor,
                       json={"rounds": 3, "config": CONFIG}).status_code == 403
    r = client.post(f"/api/v1/studies/{draft}/runs", headers=sponsor, json={"rounds": 3, "config": CONFIG})
    assert r.status_code == 202 and r.json()["status"] == "pending"
    run_id = r.json()["id"]
    busy = client.post(f"/api/v1/studies/{draft}/runs", headers=sponsor, json={"rounds": 3, "config": CONFIG})
    assert busy.status_code == 409 and f"run {run_id}" in busy.json()["detail"]
    shown = client.get(f"/api/v1/runs/{run_id}", headers=auditor).json()
    assert shown["rounds_done"] == 0 and shown["history"] == []
    assert client.post(f"/api/v1/runs/{run_id}/stop", headers=sponsor).json()["status"] == "stopped"
    assert client.post(f"/api/v1/runs/{run_id}/stop", headers=sponsor).status_code == 409
    assert [x["id"] for x in client.get(f"/api/v1/runs?study={draft}", headers=auditor).json()["runs"]] == [run_id]
    assert client.get("/api/v1/runs/999", headers=auditor).status_code == 404


def test_rounds_are_ingested_once_with_numbers_only(client, headers_for):
    from evoclone.coordinator.runs import RunConfig, ingest_rounds, launch_run, round_metrics

    study = _study(client, headers_for)
    doc = {"run_id": 77, "rounds": [{"round": 1, "train_loss": 1.4, "val_metric": 0.66, "status": "aggregated",
                                     "participation": [
                                         {"site": "north", "status": "ok", "examples": 154, "epsilon_spent": 0.86,
                                          "val_loss": 1.8, "note": "free text never stored"},
                                         {"site": "south", "status": "refused", "reason": "budget"},
                                         {"site": "elsewhere", "status": "ok", "epsilon_spent": 0.5}]}]}
    with Session(client.app.state.engine) as s:
        run = launch_run(session=s, study_id=study, rounds=2, config=RunConfig(**CONFIG), created_by="t")
        assert ingest_rounds(session=s, run_id=run.id, doc=doc) == 1
        assert ingest_rounds(session=s, run_id=run.id, doc=doc) == 0  # polled again: nothing twice
        rows = round_metrics(session=s, run_id=run.id)
    assert len(rows) == 3  # the aggregate, north, south (a site the coordinator does not know is skipped)
    agg = next(m for m in rows if m.site_id is None)
    assert agg.metrics == {"train_loss": 1.4, "val_metric": 0.66}
    north = next(m for m in rows if m.epsilon == 0.86)
    assert north.metrics == {"examples": 154.0, "val_loss": 1.8, "trained": 1.0}
    south = next(m for m in rows if m.site_id is not None and m.epsilon is None)
    assert south.metrics == {"trained": 0.0}


@pytest.mark.slow
def test_dispatcher_runs_a_queued_run_on_a_real_superlink(client, headers_for, tmp_path):
    """SuperLink + two guarded SuperNodes (the sites' nodes) on loopback; the API queues, the dispatcher runs."""
    from lifelines.datasets import load_gbsg2

    from evoclone.cli.federation import Federation
    from evoclone.cli.train_jobs import TrainOptions, prepare_sites, validate
    from evoclone.coordinator.dispatcher import RunDispatcher
    from evoclone.federated.tabular import OutcomeColumns

    study = _study(client, headers_for)
    data = load_gbsg2().head(240).assign(hospital=lambda d: ["north", "south"] * (len(d) // 2))
    data[["hospital", "horTh", "age", "pnodes", "time", "cens"]].to_csv(tmp_path / "t.csv", index=False)
    opts = TrainOptions(data=tmp_path / "t.csv", site_column="hospital", treatment="horTh",
                        outcome=OutcomeColumns(time="time", event="cens"), out=tmp_path / "unused",
                        covariates=["age", "pnodes"], insecure=True, work_dir=tmp_path / "sites", batch_size=16)
    patients, events, names = validate(opts)
    parts, _, _ = prepare_sites(opts, patients, events, names)
    sponsor = headers_for(client, "sponsor")
    r = client.post(f"/api/v1/studies/{study}/runs", headers=sponsor,
                    json={"rounds": 2, "config": {**CONFIG, "local_epochs": 1}})
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    from evoclone.coordinator.registry import register_run_model

    registered = []
    settings = client.app.state.settings

    def register(session, run, model_dir):
        registered.append(model_dir)
        register_run_model(session=session, run=run, model_dir=model_dir, settings=settings)

    with Federation(tmp_path / "sites", parts, insecure=True, engine="deployment") as fed:
        dispatcher = RunDispatcher(settings, fed.link, on_finished=register)
        dispatcher.tick()
        dispatcher.stop()
    shown = client.get(f"/api/v1/runs/{run_id}", headers=sponsor).json()
    assert shown["status"] == "finished", shown
    assert shown["flower_run_id"] and shown["rounds_done"] == 2
    for rnd in shown["history"]:
        assert {s["site_id"] for s in rnd["sites"]} == {1, 2}
        assert all(0 < s["epsilon"] <= 3.0 and s["metrics"]["trained"] == 1.0 for s in rnd["sites"])
    assert registered and (registered[0] / "manifest.json").is_file()
    entry = json.loads((registered[0] / "manifest.json").read_text())["components"]["predictor"]
    assert entry["study"] == "gbsg" and entry["run"] == run_id and entry["columns"]["covariates"] == ["age", "pnodes"]
    assert pd.notna(shown["finished_at"])
    models = client.get(f"/api/v1/models?study={study}", headers=sponsor).json()
    models = models["models"] if isinstance(models, dict) else models
    assert len(models) == 1 and models[0]["status"] == "registered" and models[0]["signature"]


def test_drift_relaunches_the_last_finished_run_when_auto_retrain_is_on(settings, headers_for, tmp_path):
    from fastapi.testclient import TestClient

    from evoclone.coordinator.api.main import create_app
    from evoclone.coordinator.models import Run, RunStatus
    from evoclone.site_node import drift

    from .test_reports import cohort_pair, enrol_reporting_site, new_site, older, send

    records = cohort_pair()[0]
    auto = settings.model_copy(update={"drift_auto_retrain": True})
    with TestClient(create_app(auto), raise_server_exceptions=False) as client:
        admin, sponsor = headers_for(client, "admin"), headers_for(client, "sponsor")
        site_id, token = enrol_reporting_site(client, admin, new_site(tmp_path, "st-ann", records))
        site_dir = tmp_path / "st-ann"
        study = client.post("/api/v1/studies", headers=sponsor, json={
            "name": "ckd", "indication": "CKD", "phase": "III", "arms": ["control", "treatment"], "endpoints": ["os"],
            "target_epsilon": 3.0, "target_delta": 1e-5, "site_ids": [site_id]}).json()["id"]
        client.patch(f"/api/v1/studies/{study}", headers=sponsor, json={"status": "active"})
        with Session(client.app.state.engine) as s:  # a run that finished before the data drifted
            s.add(Run(study_id=study, rounds=4, config={**CONFIG, "members": 3}, status=RunStatus.finished,
                      created_by="alice"))
            s.commit()
        r = send(client, drift.drift_report(site_dir=site_dir, records=older(records, 12)), token,
                 "/api/v1/reports/drift")
        assert r.status_code == 201 and len(r.json()["retrain_requests"]) == 1, r.text
        runs = client.get(f"/api/v1/runs?study={study}", headers=sponsor).json()["runs"]
        assert [(x["status"], x["created_by"], x["rounds"]) for x in runs] == [
            ("pending", "coordinator:drift", 4), ("finished", "alice", 4)]
        assert runs[0]["config"]["members"] == 3 and runs[0]["config"]["covariates"] == CONFIG["covariates"]
        reqs = client.get("/api/v1/drift/retrain", params={"study": study}, headers=sponsor).json()
        assert [(q["status"], q["run_id"]) for q in reqs] == [("launched", runs[0]["id"])]
        # while that run is pending, a new request stays open for the sponsor
        r = send(client, drift.drift_report(site_dir=site_dir, records=older(records, 20)), token,
                 "/api/v1/reports/drift")
        assert len(r.json()["retrain_requests"]) == 1
        statuses = [q["status"] for q in client.get("/api/v1/drift/retrain", params={"study": study},
                                                    headers=sponsor).json()]
        assert sorted(statuses) == ["launched", "requested"]
