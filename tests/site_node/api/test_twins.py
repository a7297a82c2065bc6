"""Twin inference at the site: signed model install, cached twins and predictions (hit/miss/unavailable), cohort
jobs, and bad input: unknown or foreign patients, malformed parameters, huge counts, a model that fails to load."""

from __future__ import annotations

import logging
import time

import pytest
from sqlmodel import Session

from .conftest import MRN, NAME, PHONE, REDIS
from .twin_model import coordinator_key, installed, model_dir, public_pem, signed_bundle  # noqa: F401 (fixtures)

R = {"reason": "treatment"}


def _actions(client) -> list[tuple[str, str, str]]:
    from evoclone.site_node.access_log import list_entries

    with Session(client.app.state.engine) as session:
        return [(e.action, e.pseudonym, e.outcome) for e in list_entries(session=session, limit=10_000)]


def _twins(client, headers, patient, **body):
    return client.post(f"/api/v1/patients/{patient}/twins", params=R, headers=headers,
                       json={"arm": "treatment", "count": 3, **body})


def test_twins_and_predictions_are_cached_per_model_version_and_logged(client, clinician, admin, patient, installed,
                                                                       model_dir, coordinator_key, caplog):
    caplog.set_level(logging.DEBUG)
    r = _twins(client, clinician, patient)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert r.headers["x-cache"] == "miss" and doc["model_version"] == "v1" and doc["arm"] == "treatment"
    assert doc["passed"] + doc["failed"] == 3 and len(doc["twins"]) == doc["passed"]
    for t in doc["twins"]:
        assert 0 <= t["quality"] <= 1 and t["review_id"] is not None
        assert all(0 < e[0] <= doc["horizon_days"] for e in t["events"])
    again = _twins(client, clinician, patient)
    assert again.headers["x-cache"] == "hit" and again.json() == doc
    assert _twins(client, clinician, patient, seed=1).headers["x-cache"] == "miss"  # parameters are in the key
    short = _twins(client, clinician, patient, horizon_days=90).json()
    assert all(e[0] <= 90 for t in short["twins"] for e in t["events"]) and short["horizon_days"] == 90
    url = f"/api/v1/patients/{patient}/prediction"
    p = client.get(url, params={**R, "arm": "control"}, headers=clinician)
    assert p.status_code == 200 and p.headers["x-cache"] == "miss", p.text
    pred = p.json()
    assert pred["ci_low"] <= pred["risk"] <= pred["ci_high"] and pred["interval"] == 0.95
    assert pred["category"] and len(pred["top_features"]) == 3
    assert client.get(url, params={**R, "arm": "control"}, headers=clinician).headers["x-cache"] == "hit"
    assert client.get(url, params={**R, "arm": "treatment"}, headers=clinician).headers["x-cache"] == "miss"
    actions = [a for a, _, _ in _actions(client)]
    assert actions.count("twin.generate") == 3 and actions.count("twin.read") == 1
    assert actions.count("prediction.read") == 3 and all(p == patient for _, p, _ in _actions(client))
    # a new promoted version never reads the old version's results
    from evoclone.site_node.local_models import install_bundle

    install_bundle(engine=client.app.state.engine, site_dir=client.app.state.settings.site_dir,
                   bundle=signed_bundle(model_dir, coordinator_key, version="v2"))
    r = _twins(client, clinician, patient)
    assert r.headers["x-cache"] == "miss" and r.json()["model_version"] == "v2"
    assert client.delete("/api/v1/models/cache", headers=admin).json()["removed"] >= 1
    assert _twins(client, clinician, patient).headers["x-cache"] == "miss"
    models = client.get("/api/v1/models", headers=clinician).json()
    assert [(m["version"], m["promoted"]) for m in models] == [("v2", True), ("v1", False)]
    assert client.post("/api/v1/models/v1/promote", headers=admin).json()["promoted"] is True
    assert _twins(client, clinician, patient).json()["model_version"] == "v1"
    assert client.post("/api/v1/models/v9/promote", headers=admin).status_code == 404
    assert client.post("/api/v1/models/v1/promote", headers=clinician).status_code == 403
    for text in (r.text, p.text, caplog.text):
        assert MRN not in text and NAME not in text and PHONE not in text


def test_bad_input(client, clinician, headers_for, patient, installed, tmp_path):
    from evoclone.privacy.pseudonym import Pseudonymizer

    base = f"/api/v1/patients/{patient}"
    for body, what in (({"arm": "treatment", "count": 51}, "count"), ({"arm": "treatment", "count": 10**9}, "count"),
                       ({"arm": "treatment", "count": 0}, "count"), ({"arm": "placebo", "count": 1}, "arm"),
                       ({"count": 1}, "arm"), ({"arm": "control", "count": "many"}, "count"),
                       ({"arm": "control", "count": 1, "horizon_days": -3}, "horizon")):
        r = client.post(f"{base}/twins", params=R, headers=clinician, json=body)
        assert r.status_code == 422 and what in r.json()["detail"], (body, r.text)
    r = _twins(client, clinician, patient, horizon_days=36000)
    assert r.status_code == 422 and "horizon_days may be at most" in r.json()["detail"]
    assert client.get(f"{base}/prediction", params=R, headers=clinician).status_code == 422  # no arm
    assert client.get(f"{base}/prediction", params={"arm": "control"}, headers=clinician).status_code == 422
    r = client.get(f"{base}/prediction", params={**R, "arm": "control"}, headers=headers_for(client, "auditor"))
    assert r.status_code == 403
    unknown = "P-" + "0" * 32
    foreign = Pseudonymizer(key=b"another site's key 32 bytes long").pseudonym(MRN)  # a real patient elsewhere
    for other in (unknown, foreign):
        for r in (_twins(client, clinician, other),
                  client.get(f"/api/v1/patients/{other}/prediction", params={**R, "arm": "control"},
                             headers=clinician)):
            assert r.status_code == 404 and other not in r.text and "pseudonym" in r.json()["detail"]
    assert ("twin.generate", "", "not_found") in _actions(client)
    r = client.post(f"/api/v1/patients/{MRN}/twins", params=R, headers=clinician, json={"arm": "control", "count": 1})
    assert r.status_code == 422 and MRN not in r.text


def test_a_model_that_fails_to_load_is_a_503_never_a_500(client, clinician, patient, model_dir, coordinator_key):
    r = _twins(client, clinician, patient)
    assert r.status_code == 409 and r.json()["detail"].startswith("no model version is promoted at this site")
    from evoclone.site_node.local_models import install_bundle, models_root

    settings = client.app.state.settings
    install_bundle(engine=client.app.state.engine, site_dir=settings.site_dir,
                   bundle=signed_bundle(model_dir, coordinator_key, version="v1"),
                   public_key_pem=public_pem(coordinator_key))
    weights = models_root(settings.site_dir) / "v1" / "generator.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one flipped bit on disk after installation
    weights.write_bytes(bytes(data))
    for r in (_twins(client, clinician, patient),
              client.get(f"/api/v1/patients/{patient}/prediction", params={**R, "arm": "control"}, headers=clinician),
              client.post("/api/v1/jobs/cohort-predictions", params=R, headers=clinician, json={"arm": "control"})):
        assert r.status_code == 503 and "model failed to load" in r.json()["detail"], r.text
        assert "\n" not in r.json()["detail"]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from evoclone.site_node.errors import InvalidInput

    with pytest.raises(InvalidInput, match="refused"):  # signed by a key the site does not trust
        install_bundle(engine=client.app.state.engine, site_dir=settings.site_dir,
                       bundle=signed_bundle(model_dir, Ed25519PrivateKey.generate(), version="v2"))


def test_redis_unavailable_serves_uncached_and_recovers(client, clinician, patient, installed):
    from evoclone.federated.stores.cache import RedisCache
    from evoclone.site_node.inference import SiteCache

    namespace = f"evoclone-test-twins-{patient[2:14]}"
    real = RedisCache(url=REDIS, namespace=namespace)
    real.delete_prefix("")
    dead = RedisCache(url="redis://127.0.0.1:1/0", namespace=namespace)
    assert _twins(client, clinician, patient).status_code == 200  # creates the services
    client.app.state.twins.cache = cache = SiteCache(backend=dead, ttl_seconds=60, retry_after_s=0)
    url = f"/api/v1/patients/{patient}/prediction"
    for _ in range(2):
        r = client.get(url, params={**R, "arm": "control"}, headers=clinician)
        assert r.status_code == 200 and r.headers["x-cache"] == "unavailable"
    assert _twins(client, clinician, patient, seed=5).headers["x-cache"] == "unavailable"
    cache.backend = real  # Redis is back
    try:
        assert client.get(url, params={**R, "arm": "control"}, headers=clinician).headers["x-cache"] == "miss"
        assert client.get(url, params={**R, "arm": "control"}, headers=clinician).headers["x-cache"] == "hit"
        assert any(k.startswith(f"{namespace}:v1:prediction:".encode()) for k in real.client.scan_iter())
    finally:
        real.delete_prefix("")
        real.close()


def test_cohort_job_progress_and_cancel(client, clinician, patient, installed):
    r = client.post("/api/v1/jobs/cohort-predictions", params=R, headers=clinician, json={"arm": "treatment"})
    assert r.status_code == 202, r.text
    job = r.json()
    for _ in range(600):
        job = client.get(f"/api/v1/jobs/{job['id']}", headers=clinician).json()
        if job["status"] != "running":
            break
        time.sleep(0.05)
    assert job["status"] == "done" and job["done"] == job["total"] == 2, job
    assert sum(job["result"]["categories"].values()) == 2 and 0 <= job["result"]["mean_risk"] <= 1
    assert [a for a, _, _ in _actions(client)].count("cohort.predict") == 2
    from evoclone.site_node.inference import Job

    gate = __import__("threading").Event()

    def slow(j: Job) -> None:
        j.total = 100
        while not j.cancel.is_set():
            gate.wait(0.01)

    started = client.app.state.twins.jobs.start("cohort-predictions", slow)
    r = client.delete(f"/api/v1/jobs/{started.id}", headers=clinician)
    assert r.status_code == 202
    for _ in range(200):
        if client.get(f"/api/v1/jobs/{started.id}", headers=clinician).json()["status"] == "cancelled":
            break
        time.sleep(0.02)
    assert client.get(f"/api/v1/jobs/{started.id}", headers=clinician).json()["status"] == "cancelled"
    assert client.get("/api/v1/jobs/nope", headers=clinician).status_code == 404


def test_site_model_cli_installs_lists_and_promotes(site_dir, model_dir, coordinator_key, tmp_path):
    import json

    from typer.testing import CliRunner

    from evoclone.cli.site_models import model_app

    runner = CliRunner()
    (tmp_path / "v1.tar").write_bytes(signed_bundle(model_dir, coordinator_key, version="v1"))
    (tmp_path / "v2.tar").write_bytes(signed_bundle(model_dir, coordinator_key, version="v2"))
    (tmp_path / "coordinator.pem").write_bytes(public_pem(coordinator_key))
    base = ["--site-dir", str(site_dir)]
    r = runner.invoke(model_app, ["install", *base, "--bundle", str(tmp_path / "v1.tar"), "--public-key",
                                  str(tmp_path / "coordinator.pem"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["version"] == "v1" and json.loads(r.stdout)["promoted"] is True
    r = runner.invoke(model_app, ["install", *base, "--bundle", str(tmp_path / "v2.tar"), "--no-promote", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["promoted"] is False, r.output  # the pinned key verifies it
    r = runner.invoke(model_app, ["install", *base, "--bundle", str(tmp_path / "v2.tar")])
    assert r.exit_code == 1 and "already installed" in r.output
    r = runner.invoke(model_app, ["promote", *base, "v2", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["promoted"] is True
    r = runner.invoke(model_app, ["list", *base, "--json"])
    assert [json.loads(x)["promoted"] for x in r.stdout.splitlines()] == [True, False]
    r = runner.invoke(model_app, ["install", *base, "--bundle", str(tmp_path / "missing.tar")])
    assert r.exit_code == 2 and "readable file" in r.output
