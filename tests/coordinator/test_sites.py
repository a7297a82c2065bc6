"""Enrolment: CSR -> pending -> accept (certificate from the study CA, SuperNode key authorised) -> revoke -> re-enrol."""

from __future__ import annotations

import pytest

from evoclone.privacy.enrolment import new_csr, verify_client_cert
from evoclone.privacy.pki import PKIError

from .conftest import enrol_payload


def test_enrol_accept_certificate_revoke_and_re_enrol(pg_client, pg_settings, headers_for):
    client, admin = pg_client, headers_for(pg_client, "admin")
    payload = enrol_payload("st-mary")
    r = client.post("/api/v1/sites/enrol", json=payload)
    assert r.status_code == 202 and r.json()["status"] == "pending"
    site_id = r.json()["id"]
    assert "csr_pem" not in r.json() and "certificate_pem" not in r.json()
    assert client.get(f"/api/v1/sites/{site_id}/certificate").status_code == 404
    assert client.post("/api/v1/sites/enrol", json=enrol_payload("st-mary")).status_code == 409

    r = client.post(f"/api/v1/sites/{site_id}/accept", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "active" and r.json()["enrolled_at"]
    cert = client.get(f"/api/v1/sites/{site_id}/certificate").json()
    ca = (pg_settings.pki_dir / "ca.pem").read_bytes()
    assert cert["ca_pem"].encode() == ca
    info = verify_client_cert(cert["certificate_pem"].encode(), ca, name="st-mary")
    assert info["serial"] == r.json()["certificate_serial"]
    with pytest.raises(PKIError, match="names 'st-mary'"):
        verify_client_cert(cert["certificate_pem"].encode(), ca, name="st-john")
    key_file = pg_settings.node_keys_dir / "st-mary.pub"
    assert key_file.read_text().strip() == payload["supernode_public_key"].strip()
    assert client.post(f"/api/v1/sites/{site_id}/accept", headers=admin).status_code == 409

    r = client.post(f"/api/v1/sites/{site_id}/revoke", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "revoked" and r.json()["revoked_at"]
    assert not key_file.exists()
    assert client.get(f"/api/v1/sites/{site_id}/certificate").status_code == 404
    assert client.post(f"/api/v1/sites/{site_id}/revoke", headers=admin).status_code == 409

    again = enrol_payload("st-mary")
    r = client.post("/api/v1/sites/enrol", json=again)
    assert r.status_code == 202 and r.json()["id"] == site_id and r.json()["status"] == "pending"
    assert r.json()["certificate_serial"] is None and r.json()["revoked_at"] is None
    assert client.post(f"/api/v1/sites/{site_id}/accept", headers=admin).status_code == 200
    assert key_file.read_text().strip() == again["supernode_public_key"].strip()
    listed = client.get("/api/v1/sites", headers=admin, params={"status": "active"}).json()
    assert [s["name"] for s in listed] == ["st-mary"]


def test_bad_enrolment_requests_get_422_with_a_message(client):
    good = enrol_payload("site-a")
    cases = [
        ({**good, "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"},
         "csr_pem: the request is not a PEM certificate signing request"),
        ({**good, "csr_pem": new_csr("site-b")[1].decode()}, "the CSR names 'site-b' but the site is 'site-a'"),
        ({**good, "supernode_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA"},
         "supernode_public_key: Flower needs an OpenSSH ECDSA key"),
        ({**good, "supernode_public_key": "ecdsa-sha2-nistp384 bm90LWEta2V5"}, "supernode_public_key: not a valid"),
        ({**good, "name": "../etc"}, "name: String should match pattern"),
        ({k: v for k, v in good.items() if k != "csr_pem"}, "csr_pem: Field required"),
    ]
    for body, message in cases:
        r = client.post("/api/v1/sites/enrol", json=body)
        assert r.status_code == 422, (message, r.text)
        assert message in r.json()["detail"], r.json()
        assert "\n" not in r.json()["detail"]
    # the same SuperNode key cannot serve two sites
    assert client.post("/api/v1/sites/enrol", json=good).status_code == 202
    r = client.post("/api/v1/sites/enrol", json={**enrol_payload("site-c"),
                                                  "supernode_public_key": good["supernode_public_key"]})
    assert r.status_code == 409 and "already used by site 'site-a'" in r.json()["detail"]


def test_only_admins_accept_and_unknown_sites_are_404(client, headers_for):
    admin, sponsor = headers_for(client, "admin"), headers_for(client, "sponsor")
    site_id = client.post("/api/v1/sites/enrol", json=enrol_payload("site-a")).json()["id"]
    assert client.post(f"/api/v1/sites/{site_id}/accept", headers=sponsor).status_code == 403
    assert client.post(f"/api/v1/sites/{site_id}/revoke", headers=sponsor).status_code == 403
    r = client.post("/api/v1/sites/999/accept", headers=admin)
    assert r.status_code == 404 and r.json()["detail"].startswith("site 999 does not exist")
    assert client.get("/api/v1/sites/999", headers=sponsor).status_code == 404
    assert client.get("/api/v1/sites/abc", headers=sponsor).status_code == 422
