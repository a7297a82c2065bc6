"""Service-account API tokens: issued once, stored hashed, bound to a role, revocable at once."""

from __future__ import annotations

from sqlmodel import Session, select

from .conftest import bearer


def test_api_tokens_act_with_their_role_until_revoked(client, admin, patient):
    from evoclone.site_node.access_log import list_entries
    from evoclone.site_node.auth_models import ApiToken

    r = client.post("/api/v1/tokens", json={"name": "twin-batch", "role": "clinician"}, headers=admin)
    assert r.status_code == 201, r.text
    issued = r.json()
    token = issued["token"]
    assert token.startswith("evs_site_") and issued["hint"] == token[:13] and issued["revoked_at"] is None
    with Session(client.app.state.engine) as session:
        rows = session.exec(select(ApiToken)).all()
    assert len(rows) == 1 and rows[0].token_hash != token and token not in str(rows[0].model_dump())
    assert all("token" not in t for t in client.get("/api/v1/tokens", headers=admin).json())

    url = f"/api/v1/patients/{patient}"
    assert client.get(url, params={"reason": "quality_assurance"}, headers=bearer(token)).status_code == 200
    assert client.get("/api/v1/auth/me", headers=bearer(token)).json() == {
        "name": "service:twin-batch", "role": "clinician", "service_account": True}
    assert client.get("/api/v1/users", headers=bearer(token)).status_code == 403
    with Session(client.app.state.engine) as session:
        entry = list_entries(session=session)[-1]
    assert (entry.actor, entry.role, entry.pseudonym) == ("service:twin-batch", "clinician", patient)

    r = client.post("/api/v1/tokens", json={"name": "auditor-bot", "role": "auditor"}, headers=admin)
    auditor_token = r.json()["token"]
    assert client.get(url, params={"reason": "review"}, headers=bearer(auditor_token)).status_code == 403
    assert client.get("/api/v1/audit/verify", headers=bearer(auditor_token)).json()["ok"] is True

    r = client.delete(f"/api/v1/tokens/{issued['id']}", headers=admin)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    r = client.get(url, params={"reason": "review"}, headers=bearer(token))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert client.delete(f"/api/v1/tokens/{issued['id']}", headers=admin).status_code == 409
    assert client.delete("/api/v1/tokens/999", headers=admin).status_code == 404
    assert client.delete("/api/v1/tokens/99999999999", headers=admin).status_code == 422
    assert client.post("/api/v1/tokens", json={"name": "x", "role": "clinician"}, headers=bearer(auditor_token)
                       ).status_code == 403
