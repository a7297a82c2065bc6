"""FHIR ingest of the real Synthea bundle: counts right, no identifier anywhere in the stores."""

import base64
import json
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from evoclone.site_node.ingest import IngestError
from evoclone.site_node.pipeline import ingest_fhir, open_store
from evoclone.site_node.settings import get_settings, init_site

BUNDLE = Path(__file__).resolve().parents[1] / "data" / "fhir" / "synthea_sample_complete_patient.json"
PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


def _phi(bundle: dict) -> list[str]:
    """Every identifying string of the bundle's patient, and raw note text."""
    p = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    out = [p["birthDate"]]
    for n in p.get("name", []):
        out += n.get("given", []) + [n.get("family", "")]
    out += [i["value"] for i in p.get("identifier", []) if "value" in i]
    out += [t["value"] for t in p.get("telecom", [])]
    for a in p.get("address", []):
        out += a.get("line", [])
    out += [x["valueString"] for x in p.get("extension", []) if "valueString" in x]
    for e in bundle["entry"]:
        for form in e["resource"].get("presentedForm", [])[:1]:
            out.append(base64.b64decode(form["data"]).decode()[:60].strip())
    return [s for s in out if s and len(s) >= 4]


def _everything_in(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.rglob("*") if p.is_file())


@pytest.fixture(params=["sqlite", "postgresql"])
def fhir_site(request, tmp_path, monkeypatch):
    if request.param == "sqlite":
        d = tmp_path / "site"
        init_site(d, name="fhir-site")
        yield d, None
        return
    name = f"evoclone_fhir_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    monkeypatch.setenv("EVOCLONE_DATABASE_URL", f"{PG}/{name}")
    d = tmp_path / "site"
    init_site(d, name="fhir-site")
    get_settings.cache_clear()
    try:
        yield d, f"{PG}/{name}"
    finally:
        get_settings.cache_clear()
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_synthea_bundle_counts_and_no_identifier_anywhere(fhir_site):
    site, pg_url = fhir_site
    bundle = json.loads(BUNDLE.read_text())
    counts = ingest_fhir(site_dir=site, paths=[BUNDLE])
    assert counts["patients"] == 1
    assert counts["skipped_resources"] == {"Claim": 49, "ExplanationOfBenefit": 37, "CareTeam": 4, "CarePlan": 4,
                                           "Medication": 4, "SupplyDelivery": 1, "Provenance": 1}
    record = open_store(get_settings(site)).records()[0]
    kinds = [e.code.split(":")[0] for e in record.events]
    assert kinds.count("Encounter") == 37 and kinds.count("Condition") == 21
    observations = [e for e in record.events if ":" not in e.code]
    n_obs = sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    assert len({(e.time, e.code) for e in observations}) >= n_obs - 5  # BP panels add components
    assert record.baseline["sex"] == "M" and 0 <= record.baseline["age"] <= 90
    n_text = sum(len(e["resource"].get("presentedForm", [])) + len(e["resource"].get("content", []))
                 for e in bundle["entry"] if e["resource"]["resourceType"] in ("DiagnosticReport", "DocumentReference"))
    assert len(record.notes) == n_text and all("[NAME]" in n.text or "[DATE]" in n.text for n in record.notes)
    needles = _phi(bundle)
    assert any(n.startswith("999-") for n in needles)  # the SSN is among the checked values
    for note in record.notes:
        assert not [n for n in needles if n in note.text]
    blob = _everything_in(site)
    if pg_url:
        with sa.create_engine(pg_url).connect() as c:
            for table in ("patient", "data_key"):
                for row in c.execute(sa.text(f"SELECT * FROM {table}")).all():
                    blob += b"|".join(bytes(v) if isinstance(v, bytes | memoryview) else str(v).encode() for v in row)
    leaked = [n for n in needles if n.encode() in blob]
    assert leaked == []


def test_bad_fhir_is_refused_and_store_unchanged(tmp_path):
    site = tmp_path / "site"
    init_site(site, name="s")
    ingest_fhir(site_dir=site, paths=[BUNDLE])
    before = open_store(get_settings(site)).counts()
    truncated = tmp_path / "truncated.json"
    truncated.write_text(BUNDLE.read_text()[:5000])
    no_patient = tmp_path / "nopatient.json"
    doc = json.loads(BUNDLE.read_text())
    doc["entry"] = [e for e in doc["entry"] if e["resource"]["resourceType"] != "Patient"]
    no_patient.write_text(json.dumps(doc))
    bad_obs = tmp_path / "bad.ndjson"
    bad_obs.write_text(json.dumps({"resourceType": "Observation", "code": {}}) + "\n")
    for path, needle in ((truncated, "not JSON"), (no_patient, "no Patient"), (bad_obs, "status")):
        with pytest.raises(IngestError, match=needle):
            ingest_fhir(site_dir=site, paths=[path])
    assert open_store(get_settings(site)).counts() == before


def test_ndjson_bulk_export_with_more_resource_types(tmp_path):
    site = tmp_path / "site"
    init_site(site, name="s")
    ref = {"reference": "Patient/p1"}
    resources = [
        {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1931-05-02",
         "name": [{"given": ["Ada"], "family": "Quill"}], "address": [{"postalCode": "82301"}]},
        {"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"}, "subject": ref,
         "period": {"start": "2024-01-10T09:00:00Z"}},
        {"resourceType": "Immunization", "id": "i1", "status": "completed", "patient": ref,
         "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140"}]},
         "occurrenceDateTime": "2024-01-10"},
        {"resourceType": "AllergyIntolerance", "id": "a1", "patient": ref, "recordedDate": "2024-01-11",
         "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91936005"}]}},
        {"resourceType": "MedicationStatement", "id": "m1", "status": "active", "subject": ref,
         "effectiveDateTime": "2024-01-12",
         "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "617314"}]}},
        {"resourceType": "Observation", "id": "o1", "status": "final", "subject": ref, "effectiveDateTime": "2024-01-10",
         "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
         "component": [{"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                        "valueQuantity": {"value": 142, "unit": "mmHg", "code": "mm[Hg]"}},
                       {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                        "valueQuantity": {"value": 88, "unit": "mmHg", "code": "mm[Hg]"}}]},
        {"resourceType": "Observation", "id": "o2", "status": "final", "subject": ref, "effectiveDateTime": "2024-01-10",
         "code": {"coding": [{"system": "http://loinc.org", "code": "13457-7"}]},
         "valueQuantity": {"value": 3.1, "unit": "mmol/L", "code": "mmol/L"}},
        {"resourceType": "Observation", "id": "o3", "status": "final", "subject": ref, "effectiveDateTime": "2024-01-10",
         "code": {"coding": [{"system": "http://loinc.org", "code": "72166-2"}]},
         "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "266919005"}]}},
        {"resourceType": "Basic", "id": "b1", "code": {"text": "x"}},
    ]
    path = tmp_path / "export.ndjson"
    path.write_text("\n".join(json.dumps(r) for r in resources) + "\n")
    counts = ingest_fhir(site_dir=site, paths=[path])
    assert counts["skipped_resources"] == {"Basic": 1}
    r = open_store(get_settings(site)).records()[0]
    assert r.baseline == {"age": 90.0, "sex": "F", "zip3": "000"}  # top-coded age, small ZIP area
    codes = {e.code: e for e in r.events}
    assert {"Immunization:CVX:140", "AllergyIntolerance:SCT:91936005", "8480-6", "8462-4", "13457-7"} <= set(codes)
    assert any(c.startswith("MedicationStatement:") for c in codes) and any(c.startswith("72166-2=") for c in codes)
    assert codes["13457-7"].value == pytest.approx(119.877) and codes["13457-7"].unit == "mg/dL"
    assert codes["8480-6"].value == 142 and codes["Immunization:CVX:140"].time == 0
