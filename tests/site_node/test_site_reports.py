"""The site's drift report against its sealed training reference, and its signed compliance self-check."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from evoclone.federated.payloads import canonical_bytes
from evoclone.federated.record import PatientRecord
from evoclone.privacy.envelope import TamperedError
from evoclone.site_node import compliance, drift
from evoclone.site_node.settings import get_settings


@pytest.fixture(scope="module")
def cohorts():
    """Two simulated hospitals' anonymized records: the reference site's and another (shifted) one."""
    from evoclone.federated.simulator import cohort_records, simulate_cohort

    records = cohort_records(simulate_cohort(patients=400, sites=2, seed=3))
    first = records[0].site
    return [r for r in records if r.site == first], [r for r in records if r.site != first]


def _older(records: list[PatientRecord], years: float) -> list[PatientRecord]:
    return [r.model_copy(update={"baseline": {**r.baseline, "age": r.baseline["age"] + years}}) for r in records]


def _verify(payload, site_dir) -> None:
    key = compliance.report_key(site_dir)
    assert payload.key_fingerprint == compliance.key_fingerprint(key)
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(compliance.public_key_hex(key))).verify(
        bytes.fromhex(payload.signature), canonical_bytes(payload))


def test_the_reference_is_sealed_private_and_tamper_evident(site_dir, cohorts):
    ref_records, _ = cohorts
    info = drift.create_reference(site_dir=site_dir, records=ref_records)
    assert info["patients"] == 200 and info["features"] >= 10
    path = site_dir / drift.REFERENCE_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert not any(r.patient_id in text for r in ref_records)  # no pseudonym, no readable value
    ref = drift.load_reference(site_dir=site_dir)
    assert ref.reference_id == info["reference_id"] and ref.patients == 200 and ref.kinds["sex"] == "categorical"
    doc = json.loads(text)
    sealed = bytearray(doc["sealed"].encode())
    sealed[40] = ord("A") if sealed[40] != ord("A") else ord("B")
    path.write_text(json.dumps({**doc, "sealed": sealed.decode()}))
    with pytest.raises(TamperedError):
        drift.load_reference(site_dir=site_dir)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="create_reference"):
        drift.drift_report(site_dir=site_dir, records=ref_records)


def test_drift_report_flags_a_shift_is_signed_and_rounds_counts(site_dir, cohorts):
    ref_records, _ = cohorts
    drift.create_reference(site_dir=site_dir, records=ref_records)
    same = drift.drift_report(site_dir=site_dir, records=ref_records)
    assert all(f.psi == 0 for f in same.features if f.psi is not None)
    older = drift.drift_report(site_dir=site_dir, records=_older(ref_records[:187], 12.0), study_id=4)
    by_name = {f.name: f for f in older.features}
    assert by_name["age"].psi > 1 and by_name["age"].ks > 0.3 and by_name["age"].mmd > 0
    assert by_name["sex"].psi < 0.05 and by_name["lab:4548-4"].kind == "numeric"
    assert (older.reference_count, older.current_count, older.study_id) == (200, 190, 4)
    assert {o.name for o in older.outcomes} == {"binary", "event"}
    _verify(older, site_dir)


def test_small_samples_and_identifier_like_columns_never_leave(site_dir, cohorts):
    ref_records, current = cohorts
    planted = [r.model_copy(update={"baseline": {**r.baseline, "mrn": f"MRN-{i:08d}", "patient_name": f"Name {i}"}})
               for i, r in enumerate(ref_records)]
    drift.create_reference(site_dir=site_dir, records=planted)
    report = drift.drift_report(site_dir=site_dir, records=current[:8])
    assert report.features_withheld == 2 and not {"mrn", "patient_name"} & {f.name for f in report.features}
    assert all(f.suppressed and f.psi is None and f.ks is None for f in report.features)
    assert all(o.suppressed for o in report.outcomes) and report.current_count == 10
    text = report.model_dump_json()
    assert "MRN-" not in text and "Name " not in text
    # 15 current patients: statistics, but over cells of at least 10 patients
    fifteen = drift.drift_report(site_dir=site_dir, records=current[:15])
    age = next(f for f in fifteen.features if f.name == "age")
    assert not age.suppressed and age.cells <= 1 + 15 // 10 and fifteen.current_count == 20


def test_the_report_key_is_created_once_mode_0600_and_refused_when_exposed(site_dir):
    key = compliance.report_key(site_dir)
    path = site_dir / compliance.REPORT_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert compliance.public_key_hex(compliance.report_key(site_dir)) == compliance.public_key_hex(key)
    reg = compliance.key_registration(site_dir=site_dir)
    assert reg.site == "site-a" and reg.public_key == compliance.public_key_hex(key)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        compliance.report_key(site_dir)


def _configure(site_dir, tmp_path, **extra) -> None:
    from evoclone.privacy.pki import new_ca

    _, ca = new_ca("test study CA")
    (tmp_path / "ca.pem").write_bytes(ca)
    path = site_dir / "site.json"
    doc = {**json.loads(path.read_text()), "retention_days": 365, "coordinator_url": "https://coord.example.org:8443",
           "tls_ca_cert": str(tmp_path / "ca.pem"), **extra}
    path.write_text(json.dumps(doc))
    get_settings.cache_clear()


def _reasons(site_dir, **kw) -> dict[str, str]:
    check = compliance.self_check(site_dir=site_dir, **kw)
    _verify(check, site_dir)
    assert all(c.passed == (c.reason in ("ok", "no_records")) for c in check.checks)
    return {c.id: c.reason for c in check.checks}


def test_self_check_of_a_bare_site_fails_what_is_not_configured(site_dir):
    assert _reasons(site_dir) == {"encryption_at_rest": "ok", "transport_tls": "not_configured",
                                  "privacy_budget": "no_records", "audit_chain": "no_records",
                                  "retention": "not_configured", "approved_apps": "none_approved"}


def test_self_check_passes_when_configured_and_catches_each_failure(site_dir, tmp_path, cohorts):
    from evoclone.federated.stores.ledger import SqlLedgerStore
    from evoclone.privacy.accounting import LedgerEntry
    from evoclone.site_node.approvals import ApprovalStore
    from evoclone.site_node.pipeline import open_store

    _configure(site_dir, tmp_path)
    settings = get_settings(site_dir)
    store = open_store(settings)
    store.upsert_records(records=cohorts[0][:50])
    store.close()
    apps = ApprovalStore(url=settings.db_url)
    apps.approve("ab" * 32, admin="dpo", note="fusion trainer 1.0")
    apps.close()
    ledger = SqlLedgerStore(url=settings.db_url)
    ledger.open(epsilon_budget=settings.epsilon_budget, delta=settings.delta)
    for rnd in (1, 2):
        ledger.charge(LedgerEntry(run_id="r1", round=rnd, noise_multiplier=2.0, sample_rate=0.01, steps=10))
    ledger.close()
    check = compliance.self_check(site_dir=site_dir)
    assert all(c.passed and c.reason == "ok" for c in check.checks), check.checks
    assert check.approved_apps == ("ab" * 32,) and check.retention_days == 365 and check.expired_data is False
    assert 0 < check.epsilon_spent <= check.epsilon_budget == 3.0

    engine = sa.create_engine(settings.db_url)
    with engine.begin() as conn:  # an edited charge no longer matches what the accountant gives
        conn.execute(sa.text("UPDATE privacy_charge SET noise_multiplier = 3.0 WHERE round = 1"))
    assert _reasons(site_dir)["audit_chain"] == "ledger_inconsistent"
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE privacy_charge SET noise_multiplier = 2.0 WHERE round = 1"))
        conn.execute(sa.text("UPDATE data_key SET created_at = :t"), {"t": datetime.now(timezone.utc)
                                                                      - timedelta(days=800)})
    engine.dispose()
    assert _reasons(site_dir)["retention"] == "expired_data_present"
    assert _reasons(site_dir, now=datetime.now(timezone.utc) - timedelta(days=500))["retention"] == "ok"

    (site_dir / "master.keys").chmod(0o644)
    assert _reasons(site_dir)["encryption_at_rest"] == "key_file_exposed"
    (site_dir / "master.keys").chmod(0o600)
    _configure(site_dir, tmp_path, coordinator_url="http://coord.example.org:8080", epsilon_budget=2.0)
    reasons = _reasons(site_dir)
    assert reasons["transport_tls"] == "plaintext_url" and reasons["privacy_budget"] == "budget_changed"
    _configure(site_dir, tmp_path, tls_ca_cert=str(tmp_path / "missing.pem"), epsilon_budget=3.0)
    assert _reasons(site_dir)["transport_tls"] == "ca_missing"
