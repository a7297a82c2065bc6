"""The skeleton answers: health, login with TOTP, an authenticated patient read with a reason."""


def test_clinician_reads_a_patient_with_a_reason(client, clinician, patient):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get(f"/api/v1/patients/{patient}", params={"reason": "treatment"}, headers=clinician)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pseudonym"] == patient and body["arm"] == "treatment" and body["n_events"] == 2
    assert r.headers["cache-control"] == "no-store"
