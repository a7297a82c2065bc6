"""Login, token expiry and forgery, refresh rotation, and role checks."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import jwt

from evoclone.coordinator.security import ACCESS, REFRESH, create_token

from .conftest import PASSWORD, add_user, login


def test_login_form_and_json_and_me(client):
    add_user(client, "ana", "sponsor")
    pair = login(client, "ana")
    assert pair["token_type"] == "bearer" and pair["expires_in"] == 15 * 60
    r = client.post("/api/v1/auth/token", json={"username": "ana", "password": PASSWORD})
    assert r.status_code == 200
    me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {r.json()['access_token']}"})
    assert me.status_code == 200 and me.json()["username"] == "ana" and me.json()["role"] == "sponsor"
    assert "password_hash" not in me.json()


def test_wrong_password_and_unknown_user_look_the_same(client):
    add_user(client, "ana", "sponsor")
    wrong = client.post("/api/v1/auth/token", data={"username": "ana", "password": "not the password"})
    unknown = client.post("/api/v1/auth/token", data={"username": "bob", "password": PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json() == {"detail": "wrong username or password"}
    assert client.post("/api/v1/auth/token", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/api/v1/auth/token", json={"username": "ana"}).status_code == 422


def test_missing_expired_forged_and_wrong_type_tokens_are_401(client, settings):
    add_user(client, "ana", "sponsor")
    assert client.get("/api/v1/studies").json()["detail"].startswith("missing bearer token")
    old = datetime.now(timezone.utc) - timedelta(hours=1)
    expired, _ = create_token(settings=settings, subject="ana", role="sponsor", type=ACCESS, now=old)
    r = client.get("/api/v1/studies", headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401 and "expired" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    forged = jwt.encode({"sub": "ana", "role": "admin", "type": "access", "jti": "x", "iss": "evoclone-coordinator",
                         "exp": int(datetime.now(timezone.utc).timestamp()) + 600}, "another secret " * 4,
                        algorithm="HS256")
    r = client.get("/api/v1/studies", headers={"Authorization": f"Bearer {forged}"})
    assert r.status_code == 401 and "invalid" in r.json()["detail"]
    none_alg = jwt.encode({"sub": "ana", "role": "admin", "type": "access"}, None, algorithm="none")
    assert client.get("/api/v1/studies", headers={"Authorization": f"Bearer {none_alg}"}).status_code == 401
    refresh = login(client, "ana")["refresh_token"]
    r = client.get("/api/v1/studies", headers={"Authorization": f"Bearer {refresh}"})
    assert r.status_code == 401 and "'access' token is required" in r.json()["detail"]
    # a token whose role was changed by its holder would need the secret; a role that differs from the user's is refused
    admin_claim, _ = create_token(settings=settings, subject="ana", role="admin", type=ACCESS)
    assert client.get("/api/v1/sites", headers={"Authorization": f"Bearer {admin_claim}"}).status_code == 401


def test_refresh_rotation_and_reuse_ends_every_session(client, settings):
    add_user(client, "ana", "sponsor")
    first = login(client, "ana")
    r = client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 200
    second = r.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert client.get("/api/v1/studies", headers={"Authorization": f"Bearer {second['access_token']}"}).status_code \
        == 200
    reuse = client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert reuse.status_code == 401 and "already used" in reuse.json()["detail"]
    # the reuse revoked the rotated token too: a stolen refresh token cannot outlive its detection
    assert client.post("/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]}).status_code == 401
    access, _ = create_token(settings=settings, subject="ana", role="sponsor", type=ACCESS)
    r = client.post("/api/v1/auth/refresh", json={"refresh_token": access})
    assert r.status_code == 401
    unknown, _ = create_token(settings=settings, subject="ana", role="sponsor", type=REFRESH)  # never issued
    assert client.post("/api/v1/auth/refresh", json={"refresh_token": unknown}).status_code == 401


def test_roles_outside_their_rights_get_403(client, headers_for):
    auditor, sponsor = headers_for(client, "auditor"), headers_for(client, "sponsor")
    study = {"name": "s", "indication": "x", "phase": "II", "arms": ["a", "b"], "endpoints": ["os"],
             "target_epsilon": 1, "target_delta": 1e-5, "site_ids": [1]}
    r = client.post("/api/v1/studies", headers=auditor, json=study)
    assert r.status_code == 403 and r.json()["detail"] == "role 'auditor' may not do this; it needs one of: sponsor, admin"
    r = client.post("/api/v1/sites/1/accept", headers=sponsor)
    assert r.status_code == 403 and "needs one of: admin" in r.json()["detail"]
    assert client.get("/api/v1/audit/events", headers=sponsor).status_code == 403
    assert client.get("/api/v1/audit/events", headers=auditor).status_code == 200
    assert client.post("/api/v1/sites/1/accept").status_code == 401
