"""The model registry: signed registration, canary rollout with site reports, automatic and manual
promotion and rollback, site tokens, role checks, bad input without partial writes, and the audit trail."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from pydantic import SecretStr
from sqlmodel import Session, select

from evoclone.coordinator.audit import verify_stored_chain
from evoclone.coordinator.models import AuditEvent
from evoclone.coordinator.registry_models import CanaryReport, ModelVersion, Rollout
from evoclone.federated import artifacts
from evoclone.federated.payloads import CanaryValidation
from evoclone.federated.signature import SignatureError, verify_bundle, verify_manifest

from .conftest import active_site, enrol_payload


def model_dir(root: Path, seed: int, *, sites=("site-a", "site-b", "site-c")) -> Path:
    """A predictor directory as a federated run writes it (lineage in the manifest) plus training.json."""
    d = root / f"model-{seed}"
    g = torch.Generator().manual_seed(seed)
    extra = {"training": "federated_dp_fedavg", "run_key": f"fusion-{seed:012d}", "rounds": 3, "best_round": 2,
             "sites": [{"name": s, "epsilon": 0.5 + i, "delta": 1e-5, "examples": 80} for i, s in enumerate(sites)],
             "epsilon": 2.5, "delta": 1e-5, "metrics": {"val_c_index": 0.7, "val_loss": 1.2},
             "data_fingerprint": f"{seed:064x}", "residual_sd": float("nan")}
    artifacts.save_component(d, "predictor", {"w": torch.randn(16, 8, generator=g)}, kind="fusion_predictor",
                             config={"d_model": 8}, vocabulary={"features": ["age", "sex"]}, extra=extra)
    (d / "training.json").write_text(json.dumps({"sites": [{"name": "site-a", "epsilon_spent": 0.75}]}))
    return d


def upload(client, headers, study_id: int, d: Path, *, replace: dict[str, bytes] | None = None,
           extra: dict[str, bytes] | None = None, drop: tuple[str, ...] = (), run_id: int | None = None):
    """POST a model directory as multipart: manifest, every file it names, training.json."""
    manifest = json.loads((d / "manifest.json").read_text())
    names = [n for c in manifest["components"].values() for n in (c["weights"], c["vocabulary"])]
    contents = {n: (d / n).read_bytes() for n in names if n not in drop}
    contents.update(replace or {})
    contents.update(extra or {})
    files = [("manifest", ("manifest.json", (replace or {}).get("manifest.json", (d / "manifest.json").read_bytes()),
                           "application/json"))]
    files += [("files", (n, data, "application/octet-stream")) for n, data in contents.items() if n != "manifest.json"]
    files.append(("training", ("training.json", (d / "training.json").read_bytes(), "application/json")))
    data = {"run_id": str(run_id)} if run_id is not None else None
    return client.post(f"/api/v1/studies/{study_id}/models", headers=headers, files=files, data=data)


def report(site: str, version: str, candidate: float, current: float | None, metric: str = "c_index") -> bytes:
    """A canary report as a site sends it."""
    return CanaryValidation(site=site, sent_at=datetime.now(timezone.utc), version_id=version, metric=metric,
                            candidate=candidate, current=current, patients=50).model_dump_json().encode()


def post_report(client, token: dict, version: str, body: bytes):
    return client.post(f"/api/v1/models/{version}/validation", headers={**token, "Content-Type": "application/json"},
                       content=body)


def setup_study(client, headers_for, names=("site-a", "site-b", "site-c")) -> tuple[int, dict, dict[str, dict]]:
    """Active sites, a study over them, and each site's token headers: (study id, sponsor headers, tokens)."""
    admin, sponsor = headers_for(client, "admin"), headers_for(client, "sponsor")
    ids = {n: active_site(client, admin, n) for n in names}
    r = client.post("/api/v1/studies", headers=sponsor, json={
        "name": "ACME-301", "indication": "NSCLC", "phase": "III", "arms": ["control", "drug"],
        "endpoints": ["os"], "target_epsilon": 3.0, "target_delta": 1e-5, "site_ids": list(ids.values())})
    assert r.status_code == 201, r.text
    study_id, tokens = r.json()["id"], {}
    for name, site_id in ids.items():
        r = client.post(f"/api/v1/sites/{site_id}/tokens", headers=admin)
        assert r.status_code == 201 and r.json()["token"].startswith("evs_"), r.text
        tokens[name] = {"Authorization": f"Bearer {r.json()['token']}"}
    return study_id, sponsor, tokens


def _events(client, action_prefix: str = "model.") -> list[AuditEvent]:
    with Session(client.app.state.engine) as s:
        return [e for e in s.exec(select(AuditEvent).order_by(AuditEvent.seq)).all()
                if e.action.startswith(action_prefix)]


def test_register_canary_reports_promote_rollback_and_audit(pg_client, headers_for, tmp_path):
    client = pg_client
    study, sponsor, tok = setup_study(client, headers_for)
    auditor = headers_for(client, "auditor")
    key = client.get("/api/v1/registry/public-key").json()
    assert key["algorithm"] == "Ed25519" and key["fingerprint"].startswith("sha256:")

    r = upload(client, sponsor, study, model_dir(tmp_path, 1))
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert (v1["id"], v1["version"], v1["status"], v1["components"]) == \
        (f"s{study}-v1", "v1", "registered", {"predictor": "fusion_predictor"})
    assert v1["key_fingerprint"] == key["fingerprint"]
    lineage = v1["lineage"]
    assert lineage["study_id"] == study and lineage["rounds"] == {"predictor": 3} and lineage["best_round"] == \
        {"predictor": 2}
    assert lineage["epsilon_per_site"] == {"site-a": 0.75, "site-b": 1.5, "site-c": 2.5}  # training.json wins
    assert lineage["sites"] == ["site-a", "site-b", "site-c"] and lineage["data_fingerprints"] == [f"{1:064x}"]
    assert lineage["metrics"]["predictor"]["val_c_index"] == 0.7 and lineage["run_keys"] == ["fusion-000000000001"]
    assert v1["manifest"]["components"]["predictor"]["residual_sd"] is None  # NaN is not JSON: stored as null
    digest = verify_manifest(v1["manifest"], public_key_pem=key["public_key_pem"], signature_hex=v1["signature"])
    assert digest == v1["manifest_sha256"]
    weights = v1["files"]["predictor.safetensors"]
    assert weights["key"] == "models/sha256/" + weights["sha256"]
    assert (Path(client.app.state.settings.objects_root) / weights["key"]).is_file()

    assert client.post(f"/api/v1/models/{v1['id']}/promote", headers=sponsor).json()["status"] == "promoted"
    assert [(a["channel"], a["version_id"]) for a in client.get("/api/v1/sites/site-c/model",
                                                                  headers=tok["site-c"]).json()] == \
        [("promoted", v1["id"])]

    v2 = upload(client, sponsor, study, model_dir(tmp_path, 2)).json()["id"]
    r = client.post(f"/api/v1/models/{v2}/canary", headers=sponsor, json={"sites": ["site-a", "site-b"],
                                                                          "margin": 0.05})
    assert r.status_code == 201 and r.json()["sites"] == ["site-a", "site-b"] and r.json()["decision"] is None
    assert client.get("/api/v1/sites/site-a/model", headers=tok["site-a"]).json()[0]["channel"] == "canary"
    assert client.get("/api/v1/sites/site-c/model", headers=tok["site-c"]).json()[0]["version_id"] == v1["id"]
    assert client.get("/api/v1/sites/site-c/model", headers=tok["site-a"]).status_code == 403

    # the canary site downloads and verifies the signed bundle; a site outside the canary may not fetch it
    r = client.get(f"/api/v1/models/{v2}/download", headers=tok["site-a"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assignment = client.get("/api/v1/sites/site-a/model", headers=tok["site-a"]).json()[0]
    manifest = verify_bundle(r.content, public_key_pem=key["public_key_pem"],
                             expected_digest=assignment["manifest_sha256"])
    assert manifest["components"]["predictor"]["run_key"] == "fusion-000000000002"
    with pytest.raises(SignatureError, match="differs from the signed manifest"):
        verify_bundle(_flip_weights(r.content), public_key_pem=key["public_key_pem"])
    assert client.get(f"/api/v1/models/{v2}/download", headers=tok["site-c"]).status_code == 403
    assert client.get(f"/api/v1/models/{v1['id']}/download", headers=tok["site-c"]).status_code == 200

    assert post_report(client, tok["site-c"], v2, report("site-c", v2, 0.7, 0.7)).status_code == 409
    r = post_report(client, tok["site-a"], v2, report("site-a", v2, 0.69, 0.70))
    assert r.status_code == 201 and r.json()["site"] == "site-a", r.text
    r = post_report(client, tok["site-a"], v2, report("site-a", v2, 0.69, 0.70))
    assert r.status_code == 409 and "already reported" in r.json()["detail"]
    assert client.get(f"/api/v1/models/{v2}", headers=auditor).json()["status"] == "canary"
    assert post_report(client, tok["site-b"], v2, report("site-b", v2, 0.74, 0.71)).status_code == 201
    shown = client.get(f"/api/v1/models/{v2}", headers=auditor).json()
    assert shown["status"] == "promoted" and shown["previous_id"] == v1["id"]
    rollout = shown["rollouts"][0]
    assert (rollout["decision"], rollout["decided_by"], rollout["summary"]["worse_sites"]) == \
        ("promoted", "automatic", [])
    assert rollout["summary"]["mean_delta"] == pytest.approx(0.01) and len(rollout["reports"]) == 2
    assert client.get(f"/api/v1/models/{v1['id']}", headers=auditor).json()["status"] == "retired"
    assert client.get("/api/v1/sites/site-c/model", headers=tok["site-c"]).json()[0]["version_id"] == v2

    # a candidate worse than the current version by more than the margin at one site is rolled back
    v3 = upload(client, sponsor, study, model_dir(tmp_path, 3)).json()["id"]
    assert client.post(f"/api/v1/models/{v3}/canary", headers=sponsor,
                       json={"sites": ["site-a", "site-c"]}).json()["margin"] == 0.02  # the configured default
    assert post_report(client, tok["site-a"], v3, report("site-a", v3, 0.80, 0.70)).status_code == 201
    assert post_report(client, tok["site-c"], v3, report("site-c", v3, 0.67, 0.70)).status_code == 201
    shown = client.get(f"/api/v1/models/{v3}", headers=auditor).json()
    assert shown["status"] == "rolled_back" and shown["rollouts"][0]["summary"]["worse_sites"] == ["site-c"]
    assert shown["rollouts"][0]["summary"]["mean_delta"] == pytest.approx(0.035)
    assert client.get(f"/api/v1/models/{v2}", headers=auditor).json()["status"] == "promoted"
    r = client.post(f"/api/v1/models/{v3}/promote", headers=sponsor)
    assert r.status_code == 409 and "rolled back" in r.json()["detail"]
    assert client.post(f"/api/v1/models/{v3}/canary", headers=sponsor, json={"sites": ["site-a"]}).status_code == 409

    # manual rollback of the promoted version brings back the one it replaced
    r = client.post(f"/api/v1/models/{v2}/rollback", headers=sponsor)
    assert r.status_code == 200 and r.json()["status"] == "rolled_back"
    assert client.get(f"/api/v1/models/{v1['id']}", headers=auditor).json()["status"] == "promoted"
    listed = client.get("/api/v1/models", headers=auditor, params={"study": study}).json()
    assert [(m["id"], m["status"]) for m in listed] == [(v1["id"], "promoted"), (v2, "rolled_back"),
                                                        (v3, "rolled_back")]
    assert [m["id"] for m in client.get("/api/v1/models", headers=auditor,
                                        params={"status": "promoted"}).json()] == [v1["id"]]

    events = _events(client)
    assert [(e.action, e.outcome) for e in events if e.action != "model.validation"] == [
        ("model.register", "ok"), ("model.promote", "ok"), ("model.register", "ok"), ("model.canary", "ok"),
        ("model.promote", "ok"), ("model.register", "ok"), ("model.canary", "ok"), ("model.rollback", "ok"),
        ("model.rollback", "ok")]
    auto = [e for e in events if e.action == "model.promote"][1]
    assert auto.actor == "site:site-b" and auto.detail["decided_by"] == "automatic" and auto.detail["retired"] == \
        v1["id"]
    manual = events[-1]
    assert manual.actor == "sponsor-user" and manual.detail["restored"] == v1["id"]
    assert sum(e.action == "model.validation" for e in events) == 4
    with Session(client.app.state.engine) as s:
        assert verify_stored_chain(session=s).ok


def _flip_weights(bundle: bytes) -> bytes:
    """The bundle with one byte of the weights changed (tar members are stored uncompressed)."""
    import io
    import tarfile

    out, src = io.BytesIO(), tarfile.open(fileobj=io.BytesIO(bundle))
    with tarfile.open(fileobj=out, mode="w") as tar:
        for m in src.getmembers():
            data = bytearray(src.extractfile(m).read())
            if m.name.endswith(".safetensors"):
                data[len(data) // 2] ^= 0x10
            tar.addfile(m, io.BytesIO(bytes(data)))
    return out.getvalue()


def test_bad_uploads_are_refused_without_a_partial_write(pg_client, headers_for, tmp_path):
    client = pg_client
    study, sponsor, _ = setup_study(client, headers_for, names=("site-a",))
    d = model_dir(tmp_path, 1)
    weights = bytearray((d / "predictor.safetensors").read_bytes())
    weights[-1] ^= 1
    manifest = json.loads((d / "manifest.json").read_text())
    cases = [
        (dict(replace={"predictor.safetensors": bytes(weights)}), 422,
         "files: predictor.safetensors: its sha256 differs from the manifest"),
        (dict(replace={"predictor.vocab.json": b'{"features": ["age"]}'}), 422,
         "files: predictor.vocab.json: its vocabulary hash differs"),
        (dict(drop=("predictor.vocab.json",)), 422, "files: predictor.vocab.json missing"),
        (dict(extra={"notes.txt": b"x"}), 422, "files: notes.txt not named by the manifest"),
        (dict(replace={"manifest.json": b"{not json"}), 422, "manifest: not valid JSON"),
        (dict(replace={"manifest.json": json.dumps({**manifest, "format": "other/1"}).encode()}), 422,
         "manifest: format is 'other/1'"),
        (dict(replace={"manifest.json": json.dumps({**manifest, "components": {"predictor": {
            **manifest["components"]["predictor"], "weights": "../x"}}}).encode()}), 422,
         "weights must be a plain file name"),
        (dict(run_id=999), 422, "run_id: run 999 is not a run of study"),
    ]
    for kwargs, code, message in cases:
        r = upload(client, sponsor, study, d, **kwargs)
        assert r.status_code == code and message in r.json()["detail"], (message, r.text)
        assert "\n" not in r.json()["detail"]
    r = upload(client, sponsor, 999, d)
    assert r.status_code == 404 and r.json()["detail"].startswith("study 999 does not exist")
    with Session(client.app.state.engine) as s:
        assert s.exec(select(ModelVersion)).all() == []
    assert _events(client) == []
    assert not (Path(client.app.state.settings.objects_root) / "models").exists()
    assert upload(client, sponsor, study, d).status_code == 201
    r = upload(client, sponsor, study, d)
    assert r.status_code == 409 and f"already registered as s{study}-v1" in r.json()["detail"]
    r = client.post(f"/api/v1/studies/{study}/models", headers=sponsor, files=[("files", ("a", b"x"))])
    assert r.status_code == 422 and "manifest" in r.json()["detail"]


def test_canary_and_report_bad_input(client, headers_for, tmp_path):
    study, sponsor, tok = setup_study(client, headers_for, names=("site-a", "site-b"))
    admin = headers_for(client, "admin")
    active_site(client, admin, "site-x")  # active, but not in the study
    assert client.post("/api/v1/sites/enrol", json=enrol_payload("site-p")).status_code == 202  # pending
    v1 = upload(client, sponsor, study, model_dir(tmp_path, 1)).json()["id"]
    canary = lambda sites, **kw: client.post(f"/api/v1/models/{v1}/canary", headers=sponsor,  # noqa: E731
                                             json={"sites": sites, **kw})
    for sites, kw, code, message in [
        (["site-zz"], {}, 422, "sites: site-zz not enrolled"),
        (["site-p"], {}, 422, "only active sites can run a canary, not site-p (pending)"),
        (["site-x"], {}, 422, "site-x do not take part in study"),
        ([], {}, 422, "list each canary site once"),
        (["site-a", "site-a"], {}, 422, "list each canary site once"),
        (["../etc"], {}, 422, "is not a site name"),
        (["site-a"], {"margin": 2}, 422, "margin"),
    ]:
        r = canary(sites, **kw)
        assert r.status_code == code and message in r.json()["detail"], (sites, r.text)
    assert client.post("/api/v1/models/s1-v9/canary", headers=sponsor, json={"sites": ["site-a"]}).status_code == 404
    assert client.post("/api/v1/models/nope/canary", headers=sponsor, json={"sites": ["site-a"]}).status_code == 422
    assert post_report(client, tok["site-a"], v1, report("site-a", v1, 0.7, None)).status_code == 409  # no canary
    assert canary(["site-a", "site-b"]).status_code == 201
    v2 = upload(client, sponsor, study, model_dir(tmp_path, 2)).json()["id"]
    r = client.post(f"/api/v1/models/{v2}/canary", headers=sponsor, json={"sites": ["site-a"]})
    assert r.status_code == 409 and "already in canary" in r.json()["detail"]

    bad = json.loads(report("site-a", v1, 0.7, None))
    cases = [
        ({**bad, "patient_mrn_4711": "x"}, "<unexpected field>: a string looks like an identifier"),
        ({**bad, "extra_field": 1}, "<unexpected field>: the body does not match the schema (is not a field"),
        ({**bad, "patients": 3}, "patients: the body does not match the schema (is out of range)"),
        ({**bad, "metric": "accuracy"}, "metric: the body does not match the schema"),
    ]
    for body, message in cases:
        r = post_report(client, tok["site-a"], v1, json.dumps(body).encode())
        assert r.status_code == 422 and message in r.json()["detail"], r.text
    r = post_report(client, tok["site-a"], v1, b"{not json")
    assert r.status_code == 422 and "not a JSON object" in r.json()["detail"]
    r = post_report(client, tok["site-a"], v1, report("site-a", v2, 0.7, None))
    assert r.status_code == 422 and "version_id: the report is about" in r.json()["detail"]
    r = post_report(client, tok["site-a"], v1, report("site-b", v1, 0.7, None))
    assert r.status_code == 422 and "another site than the one its token belongs to" in r.json()["detail"]
    rejected = [e for e in _events(client, "egress.") if e.outcome == "rejected"]
    assert {e.resource for e in rejected} == {"/models/{model_id}/validation"}
    assert len(rejected) == 6 and "patient_mrn_4711" not in json.dumps([e.detail for e in rejected])
    assert post_report(client, tok["site-a"], v1, report("site-a", v1, 0.7, 0.7)).status_code == 201
    r = post_report(client, tok["site-b"], v1, report("site-b", v1, 0.7, 0.7, metric="auroc"))
    assert r.status_code == 422 and "this canary compares c_index" in r.json()["detail"]
    with Session(client.app.state.engine) as s:
        assert len(s.exec(select(CanaryReport)).all()) == 1
        assert s.exec(select(Rollout)).one().decision is None


def test_roles_and_site_tokens(client, headers_for, tmp_path):
    study, sponsor, tok = setup_study(client, headers_for, names=("site-a",))
    admin, auditor = headers_for(client, "admin"), headers_for(client, "auditor")
    d = model_dir(tmp_path, 1)
    assert upload(client, auditor, study, d).status_code == 403
    assert upload(client, tok["site-a"], study, d).status_code == 401
    assert upload(client, {}, study, d).status_code == 401
    v1 = upload(client, admin, study, d).json()["id"]  # admins may register too
    for path in ("promote", "rollback"):
        assert client.post(f"/api/v1/models/{v1}/{path}", headers=auditor).status_code == 403
        assert client.post(f"/api/v1/models/{v1}/{path}", headers=tok["site-a"]).status_code == 401
    assert client.post(f"/api/v1/models/{v1}/canary", headers=auditor, json={"sites": ["site-a"]}).status_code == 403
    r = client.post(f"/api/v1/models/{v1}/rollback", headers=sponsor)
    assert r.status_code == 409 and "only a canary or the promoted version" in r.json()["detail"]
    assert client.get("/api/v1/models", headers=auditor).status_code == 200
    assert client.get("/api/v1/models", headers=tok["site-a"]).status_code == 401
    assert client.get(f"/api/v1/models/{v1}/download").status_code == 401
    assert client.get(f"/api/v1/models/{v1}/download", headers=auditor).status_code == 200
    assert client.get(f"/api/v1/models/{v1}/download", headers=tok["site-a"]).status_code == 403  # not promoted
    r = post_report(client, sponsor, v1, report("site-a", v1, 0.7, None))
    assert r.status_code == 401 and "site token" in r.json()["detail"]
    r = post_report(client, {"Authorization": "Bearer evs_forged"}, v1, report("site-a", v1, 0.7, None))
    assert r.status_code == 401 and "unknown or revoked" in r.json()["detail"]

    site_id = client.get("/api/v1/sites", headers=admin).json()[0]["id"]
    assert client.post(f"/api/v1/sites/{site_id}/tokens", headers=sponsor).status_code == 403
    listed = client.get(f"/api/v1/sites/{site_id}/tokens", headers=admin).json()
    assert len(listed) == 1 and "token" not in listed[0] and "token_hash" not in listed[0]
    assert client.get("/api/v1/sites/site-a/model", headers=tok["site-a"]).json() == []
    r = client.post(f"/api/v1/sites/{site_id}/tokens/{listed[0]['id']}/revoke", headers=admin)
    assert r.status_code == 200 and r.json()["revoked_at"]
    assert client.get("/api/v1/sites/site-a/model", headers=tok["site-a"]).status_code == 401
    assert client.post(f"/api/v1/sites/{site_id}/tokens/{listed[0]['id']}/revoke", headers=admin).status_code == 409
    fresh = {"Authorization": f"Bearer {client.post(f'/api/v1/sites/{site_id}/tokens', headers=admin).json()['token']}"}
    assert client.get("/api/v1/sites/site-a/model", headers=fresh).status_code == 200
    assert client.post(f"/api/v1/sites/{site_id}/revoke", headers=admin).status_code == 200
    assert client.get("/api/v1/sites/site-a/model", headers=fresh).status_code == 401  # a revoked site's tokens die
    assert client.post(f"/api/v1/sites/{site_id}/tokens", headers=admin).status_code == 409
    assert client.get("/api/v1/sites/nowhere/model", headers=auditor).status_code == 404


def test_a_finished_runs_model_is_registered_and_a_tampered_store_refused(client, headers_for, tmp_path):
    from evoclone.coordinator.models import Run
    from evoclone.coordinator.registry import register_run_model
    from evoclone.coordinator.errors import InvalidInput

    study, sponsor, _ = setup_study(client, headers_for, names=("site-a",))
    settings = client.app.state.settings
    with Session(client.app.state.engine, expire_on_commit=False) as s:
        run = Run(study_id=study, rounds=3, config={})
        s.add(run)
        s.commit()
        version = register_run_model(session=s, run=run, model_dir=model_dir(tmp_path, 5), settings=settings)
        assert version.run_id == run.id and version.lineage["run_id"] == run.id and version.id == f"s{study}-v1"
        version_id, run_id = version.id, run.id
        broken = model_dir(tmp_path, 6)
        (broken / "predictor.safetensors").write_bytes(b"tampered")
        with pytest.raises(InvalidInput, match="sha256 differs"):
            register_run_model(session=s, run=run, model_dir=broken, settings=settings)
    assert [(e.outcome, e.actor) for e in _events(client)] == [("ok", f"coordinator:run/{run_id}"),
                                                              ("rejected", f"coordinator:run/{run_id}")]
    shown = client.get(f"/api/v1/models/{version_id}", headers=sponsor).json()
    assert shown["run_id"] == run_id
    blob = Path(settings.objects_root) / shown["files"]["predictor.safetensors"]["key"]
    blob.write_bytes(b"corrupted")
    r = client.get(f"/api/v1/models/{version_id}/download", headers=sponsor)
    assert r.status_code == 409 and "differs from its registered sha256" in r.json()["detail"]


def test_registered_weights_live_in_minio_when_configured(settings, headers_for, tmp_path):
    """The same registration against an S3 API server: files by sha256 in the bucket, bundle served from it."""
    import io
    import tarfile

    from fastapi.testclient import TestClient
    from minio import Minio

    from evoclone.coordinator.api.main import create_app

    from ..servers import s3_server

    with s3_server() as endpoint:
        s3 = settings.model_copy(update={"minio_endpoint": endpoint, "minio_access_key": "evoclone",
                                         "minio_secret_key": SecretStr("evoclone-secret"), "minio_bucket": "models",
                                         "minio_secure": False})
        with TestClient(create_app(s3), raise_server_exceptions=False) as client:
            admin, sponsor = headers_for(client, "admin"), headers_for(client, "sponsor")
            site = active_site(client, admin, "site-a")
            study = client.post("/api/v1/studies", headers=sponsor, json={
                "name": "s3", "indication": "x", "phase": "II", "arms": ["a", "b"], "endpoints": ["os"],
                "target_epsilon": 3.0, "target_delta": 1e-5, "site_ids": [site]}).json()["id"]
            d = model_dir(tmp_path, 7)
            v = upload(client, sponsor, study, d)
            assert v.status_code == 201, v.text
            files = v.json()["files"]
            bucket = Minio(endpoint, access_key="evoclone", secret_key="evoclone-secret", secure=False)
            keys = {o.object_name for o in bucket.list_objects("models", recursive=True)}
            assert {f["key"] for f in files.values()} <= keys
            r = client.get(f"/api/v1/models/{v.json()['id']}/download", headers=sponsor)
            assert r.status_code == 200
            names = tarfile.open(fileobj=io.BytesIO(r.content)).getnames()
            assert "manifest.json" in names and "signature.json" in names
            for name in files:
                assert name in names
