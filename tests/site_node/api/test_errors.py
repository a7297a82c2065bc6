"""Every error is one line of JSON with the right status; a 500 names only the request id."""

from __future__ import annotations

import logging

import pytest


def test_errors_are_one_line_json(client, clinician, patient):
    cases = [
        (client.get("/api/v1/nowhere"), 404, "no such endpoint"),
        (client.put("/health"), 405, "method not allowed"),
        (client.get(f"/api/v1/patients/{patient}"), 401, "missing bearer token"),
        (client.post("/api/v1/auth/login", content=b"{", headers={"content-type": "application/json"}), 422,
         "totp_code"),
        (client.post("/api/v1/auth/login", content=b"x", headers={"content-type": "text/plain"}), 415,
         "application/json"),
        (client.post("/api/v1/auth/login", content=b"x" * (2 << 20), headers={"content-type": "application/json"}),
         413, "byte limit"),
        (client.get(f"/api/v1/patients/{patient}", params={"reason": "gossip"}, headers=clinician), 422, "reason"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (status, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and words in detail, detail
        assert r.headers["x-request-id"]


def test_a_server_error_is_a_request_id_only(client, clinician, patient, site_dir, caplog):
    caplog.set_level(logging.ERROR)
    (site_dir / "master.keys").chmod(0o644)  # the keyring refuses to load: an unexpected failure mid-request
    r = client.get(f"/api/v1/patients/{patient}", params={"reason": "review"}, headers={**clinician,
                                                                                          "X-Request-ID": "req-42"})
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error; give the operator request id req-42", "request_id": "req-42"}
    assert "Traceback" not in r.text and "master.keys" not in r.text
    assert "request req-42 failed: PermissionError" in caplog.text


@pytest.mark.parametrize("missing", ["jwt", "tls"])
def test_settings_refuse_unusable_secrets(site_dir, missing):
    from pydantic import ValidationError

    from evoclone.site_node.api.main import create_app
    from evoclone.site_node.settings import get_settings

    settings = get_settings(site_dir)
    if missing == "jwt":
        with pytest.raises(RuntimeError, match="jwt.secret is missing"):
            create_app(settings.model_copy(update={"jwt_secret": None}))
        with pytest.raises(ValidationError, match="example value"):
            type(settings)(site_dir=site_dir, name="s", jwt_secret="a" * 40)
    else:
        with pytest.raises(ValidationError, match="both tls_cert and tls_key"):
            type(settings)(site_dir=site_dir, name="s", tls_cert=site_dir / "c.pem")
    assert (site_dir / "jwt.secret").stat().st_mode & 0o777 == 0o600
    assert len((site_dir / "jwt.secret").read_text()) >= 48
