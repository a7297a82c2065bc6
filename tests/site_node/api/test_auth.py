"""Login with password + TOTP, lockout, rate limit, token expiry, refresh, logout and revocation, on the
in-process session store and on the real Redis."""

from __future__ import annotations

import pytest

from .conftest import PASSWORD, add_user, bearer, code, login, make_client

LOGIN = "/api/v1/auth/login"


@pytest.fixture(params=["memory", "redis"])
def any_client(request, settings, clock, patient):
    """The app with its sessions in process, then in the real Redis (random namespace, cleaned up)."""
    sessions = request.getfixturevalue("redis_store") if request.param == "redis" else None
    yield from make_client(settings, clock, sessions)


def _try(client, clock, username, secret, *, password=PASSWORD, totp=None):
    return client.post(LOGIN, json={"username": username, "password": password,
                                    "totp_code": totp or code(secret, clock)})


def test_login_needs_password_and_the_current_totp_code(any_client, clock, patient):
    secret = add_user(any_client, "ana", "clinician")
    clock.advance(30)
    wrong = "000000" if code(secret, clock) != "000000" else "111111"
    answers = [_try(any_client, clock, "ana", secret, totp=wrong), _try(any_client, clock, "ana", secret,
                                                                        password="wrong password!!"),
               _try(any_client, clock, "nobody", secret)]
    assert {r.status_code for r in answers} == {401}
    assert len({r.json()["detail"] for r in answers}) == 1  # nothing tells which part was wrong
    assert answers[0].headers["www-authenticate"] == "Bearer"
    r = _try(any_client, clock, "ana", secret)
    assert r.status_code == 200 and r.json()["role"] == "clinician" and r.json()["expires_in"] == 300
    assert _try(any_client, clock, "ana", secret).status_code == 401  # the same code works once
    clock.advance(120)
    assert _try(any_client, clock, "ana", secret, totp=pyotp_at(secret, clock, -4)).status_code == 401  # too old
    tokens = login(any_client, "ana", secret, clock)
    r = any_client.get(f"/api/v1/patients/{patient}", params={"reason": "treatment"}, headers=bearer(tokens))
    assert r.status_code == 200


def pyotp_at(secret, clock, steps):
    import pyotp

    return pyotp.TOTP(secret).at(clock().timestamp() + 30 * steps)


def test_lockout_after_five_failures_and_unlock_after_the_window(any_client, clock):
    secret = add_user(any_client, "ana", "clinician")
    for i in range(4):
        clock.advance(1)
        assert _try(any_client, clock, "ana", secret, password="wrong password!!").status_code == 401
    r = _try(any_client, clock, "ana", secret, password="wrong password!!")
    assert r.status_code == 429 and int(r.headers["retry-after"]) == 15 * 60
    clock.advance(30)
    r = _try(any_client, clock, "ana", secret)  # the right credentials do not help while locked
    assert r.status_code == 429 and "locked" in r.json()["detail"] and 0 < int(r.headers["retry-after"]) <= 15 * 60
    clock.advance(14 * 60)
    assert _try(any_client, clock, "ana", secret).status_code == 429
    clock.advance(60)
    assert _try(any_client, clock, "ana", secret).status_code == 200
    # the count starts again from zero after the lock ran out
    for _ in range(4):
        clock.advance(1)
        assert _try(any_client, clock, "ana", secret, password="wrong password!!").status_code == 401


def test_a_site_admin_unlocks_an_account(client, clock, admin):
    secret = add_user(client, "ana", "clinician")
    for _ in range(5):
        _try(client, clock, "ana", secret, password="wrong password!!")
    clock.advance(30)
    assert _try(client, clock, "ana", secret).status_code == 429
    r = client.post("/api/v1/users/ana/unlock", headers=admin)
    assert r.status_code == 200 and r.json() == {"was_locked": True}
    assert _try(client, clock, "ana", secret).status_code == 200


def test_login_rate_limit_per_address(settings, clock, patient):
    limited = settings.model_copy(update={"login_rate_per_minute": 3})
    for client in make_client(limited, clock):
        clock.now = clock.now.replace(second=0)
        for _ in range(3):
            assert _try(client, clock, "nobody", "JBSWY3DPEHPK3PXPJBSWY3DP").status_code == 401
        r = _try(client, clock, "nobody", "JBSWY3DPEHPK3PXPJBSWY3DP")
        assert r.status_code == 429 and r.headers["retry-after"] == "60" and "address" in r.json()["detail"]
        clock.advance(60)
        assert _try(client, clock, "nobody", "JBSWY3DPEHPK3PXPJBSWY3DP").status_code == 401


def test_access_token_expires_after_five_minutes_and_refresh_rotates(any_client, clock, patient):
    secret = add_user(any_client, "ana", "clinician")
    tokens = login(any_client, "ana", secret, clock)
    url, params = f"/api/v1/patients/{patient}", {"reason": "review"}
    clock.advance(299)
    assert any_client.get(url, params=params, headers=bearer(tokens)).status_code == 200
    clock.advance(1)
    r = any_client.get(url, params=params, headers=bearer(tokens))
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    r = any_client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 200, r.text
    fresh = r.json()
    assert any_client.get(url, params=params, headers=bearer(fresh)).status_code == 200
    # a refresh token works once; reusing it (a stolen copy) ends the whole session
    r = any_client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 401 and "already used" in r.json()["detail"]
    assert any_client.get(url, params=params, headers=bearer(fresh)).status_code == 401


def test_an_idle_session_ends(any_client, clock, settings):
    secret = add_user(any_client, "ana", "clinician")
    tokens = login(any_client, "ana", secret, clock)
    clock.advance(settings.session_idle_minutes * 60 + 1)
    r = any_client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 401 and "ended" in r.json()["detail"]


def test_logout_and_revocation_stop_tokens_at_once(any_client, clock, headers_for, patient):
    admin = headers_for(any_client, "site_admin")
    url, params = f"/api/v1/patients/{patient}", {"reason": "treatment"}
    secret = add_user(any_client, "ana", "clinician")
    first, second = login(any_client, "ana", secret, clock), login(any_client, "ana", secret, clock)
    assert any_client.post("/api/v1/auth/logout", headers=bearer(first)).status_code == 204
    r = any_client.get(url, params=params, headers=bearer(first))
    assert r.status_code == 401 and "session has ended" in r.json()["detail"]
    assert any_client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}).status_code == 401
    assert any_client.get(url, params=params, headers=bearer(second)).status_code == 200  # other sessions live on
    r = any_client.delete("/api/v1/users/ana/sessions", headers=admin)
    assert r.status_code == 200 and r.json() == {"ended": 1}
    assert any_client.get(url, params=params, headers=bearer(second)).status_code == 401
    third = login(any_client, "ana", secret, clock)  # revocation ends sessions, not the account
    r = any_client.patch("/api/v1/users/ana", json={"disabled": True}, headers=admin)
    assert r.status_code == 200 and r.json()["disabled"] is True
    assert any_client.get(url, params=params, headers=bearer(third)).status_code == 401
    clock.advance(30)
    assert _try(any_client, clock, "ana", secret).status_code == 401


def test_forged_or_foreign_tokens_are_refused(client, clock, clinician):
    import jwt

    claims = jwt.decode(clinician["Authorization"][7:], options={"verify_signature": False})
    forged = jwt.encode({**claims, "role": "site_admin"}, "x" * 48, algorithm="HS256")
    for headers in ({}, {"Authorization": "Bearer nonsense"}, bearer(forged), bearer("evs_site_unknown")):
        r = client.get("/api/v1/users", headers=headers)
        assert r.status_code == 401 and r.json()["detail"], r.text


def test_users_are_added_by_site_admins_with_a_totp_enrolment(client, clock, admin, clinician):
    r = client.post("/api/v1/users", json={"username": "bo", "role": "auditor", "password": PASSWORD},
                    headers=admin)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["totp_uri"].startswith("otpauth://totp/") and "password" not in body
    assert login(client, "bo", body["totp_secret"], clock)["role"] == "auditor"
    assert all("totp" not in u and "password_hash" not in u for u in client.get("/api/v1/users", headers=admin).json())
    r = client.post("/api/v1/users", json={"username": "bo", "role": "auditor", "password": PASSWORD}, headers=admin)
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    r = client.post("/api/v1/users", json={"username": "cy", "role": "root", "password": PASSWORD}, headers=admin)
    assert r.status_code == 422
    r = client.post("/api/v1/users", json={"username": "cy", "role": "auditor", "password": PASSWORD},
                    headers=clinician)
    assert r.status_code == 403 and "site_admin" in r.json()["detail"]
