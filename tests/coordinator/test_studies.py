"""Studies: validation of trial metadata and privacy targets, active sites only, status life cycle."""

from __future__ import annotations

from .conftest import active_site, enrol_payload


def study(site_ids, **over):
    """A valid study body."""
    return {"name": "ACME-301", "indication": "NSCLC", "phase": "III", "arms": ["control", "drug"],
            "endpoints": ["overall_survival", "response"], "inclusion_criteria": ["age >= 18"],
            "target_epsilon": 3.0, "target_delta": 1e-5, "site_ids": site_ids, **over}


def test_create_list_show_and_status(pg_client, headers_for):
    client = pg_client
    admin, sponsor, auditor = (headers_for(client, r) for r in ("admin", "sponsor", "auditor"))
    a, b = active_site(client, admin, "site-a"), active_site(client, admin, "site-b")
    r = client.post("/api/v1/studies", headers=sponsor, json=study([a, b]))
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["status"] == "draft" and created["created_by"] == "sponsor-user" and created["site_ids"] == [a, b]
    assert client.post("/api/v1/studies", headers=sponsor, json=study([a])).status_code == 409
    assert [s["name"] for s in client.get("/api/v1/studies", headers=auditor).json()] == ["ACME-301"]
    assert client.get(f"/api/v1/studies/{created['id']}", headers=auditor).json() == created
    assert client.get("/api/v1/studies/999", headers=auditor).status_code == 404

    patch = lambda s: client.patch(f"/api/v1/studies/{created['id']}", headers=sponsor, json={"status": s})  # noqa: E731
    assert patch("active").json()["status"] == "active"
    assert patch("paused").json()["status"] == "paused"
    assert patch("closed").json()["status"] == "closed"
    r = patch("active")
    assert r.status_code == 409 and "closed and can move to nothing" in r.json()["detail"]
    assert patch("bogus").status_code == 422
    r = client.patch(f"/api/v1/studies/{created['id']}", headers=auditor, json={"status": "paused"})
    assert r.status_code == 403


def test_validation_messages(client, headers_for):
    admin, sponsor = headers_for(client, "admin"), headers_for(client, "sponsor")
    a = active_site(client, admin, "site-a")
    pending = client.post("/api/v1/sites/enrol", json=enrol_payload("site-p")).json()["id"]
    cases = [
        (study([a], arms=["control"]), "arms: a study has exactly two distinct"),
        (study([a], arms=["x", "x"]), "arms: a study has exactly two distinct"),
        (study([a], endpoints=[]), "endpoints: a study needs 1 to 32"),
        (study([a], target_epsilon=0), "target_epsilon must be > 0"),
        (study([a], target_epsilon=-1), "target_epsilon must be > 0"),
        (study([a], target_delta=1), "target_delta must be between 0 and 1"),
        (study([a], target_delta=0), "target_delta must be between 0 and 1"),
        (study([a], phase="V"), "phase: String should match pattern"),
        (study([]), "site_ids: site_ids lists each participating site once"),
        (study([a, a]), "site_ids: site_ids lists each participating site once"),
        (study([a, 999]), "site_ids: sites [999] do not exist"),
        (study([a, pending]), "site_ids: only active sites can take part, not site-p (pending)"),
    ]
    for body, message in cases:
        r = client.post("/api/v1/studies", headers=sponsor, json=body)
        assert r.status_code == 422, (message, r.text)
        assert message in r.json()["detail"], (message, r.json())
    client.post(f"/api/v1/sites/{a}/revoke", headers=admin)
    r = client.post("/api/v1/studies", headers=sponsor, json=study([a]))
    assert r.status_code == 422 and "site-a (revoked)" in r.json()["detail"]
