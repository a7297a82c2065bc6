import hashlib
import os
import stat

import pytest

from evoclone.site_node.ingest import IngestError
from evoclone.site_node.pipeline import export_snapshot, ingest_extract, open_store
from evoclone.site_node.settings import get_settings, init_site


def _tree_digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def _site_bytes(path):
    return b"".join(p.read_bytes() for p in path.rglob("*") if p.is_file())


def test_init_site_creates_private_key_and_never_overwrites(tmp_path):
    d = tmp_path / "s"
    init_site(d, name="s")
    key = d / "secret.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    with pytest.raises(FileExistsError):
        init_site(d, name="s")


def test_ingest_anonymizes_and_is_idempotent(small_cohort, site_dir):
    cohort, out = small_cohort
    pat = cohort.patients["site-1"]
    counts = ingest_extract(site_dir=site_dir, patients_csv=out / "site-1" / "patients.csv",
                            events_csv=out / "site-1" / "events.csv")
    assert counts["patients"] == len(pat) and counts["events"] == len(cohort.events["site-1"])
    again = ingest_extract(site_dir=site_dir, patients_csv=out / "site-1" / "patients.csv",
                           events_csv=out / "site-1" / "events.csv")
    assert again["written"] == 0 and again["patients"] == len(pat)
    from evoclone.federated.stores.eventlog import open_event_log

    log = open_event_log(get_settings(site_dir).event_log_url)
    batches = log.query(kind="ingest")
    assert [b["written"] for b in batches] == [0, len(pat)] and batches[1]["records"] == len(pat)
    export_snapshot(site_dir=site_dir)
    blob = _site_bytes(site_dir)
    for col in ("mrn", "name", "phone", "birth_date"):
        for value in pat[col].head(25):
            assert value.encode() not in blob, f"raw {col} found in the site directory"
    records = open_store(get_settings(site_dir)).records()
    # enrolment dates are shifted per patient (another patient's shifted date may coincide
    # with a raw one, so this is checked patient by patient)
    from datetime import date

    from evoclone.privacy.pseudonym import Pseudonymizer
    from evoclone.site_node.settings import load_key

    p = Pseudonymizer(key=load_key(get_settings(site_dir)))
    by_id = {r.patient_id: r for r in records}
    for mrn, enrol in zip(pat["mrn"], pat["enrollment_date"]):
        stored = by_id[p.pseudonym(mrn)].index_date
        assert stored != date.fromisoformat(enrol) and stored == p.shift(date.fromisoformat(enrol), mrn)
    r = records[0]
    assert r.patient_id.startswith("P-") and "zip3" in r.baseline and len(r.baseline["zip3"]) == 3
    assert r.outcomes.time_to_event is not None and any(e.time <= 0 for e in r.events)


def _bad_birth_date(text):
    lines = text.splitlines()
    cells = lines[3].split(",")
    cells[2] = "1999-02-31"
    lines[3] = ",".join(cells)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("mutate, field", [
    (lambda t: t.replace("enrollment_date", "enrolment"), "enrollment_date"),
    (_bad_birth_date, "birth_date"),
    (lambda t: t + t.splitlines()[1] + "\n", "mrn"),
])
def test_bad_extract_names_the_place_not_the_value_and_leaves_the_store_unchanged(small_cohort, site_dir, tmp_path, mutate, field):
    cohort, out = small_cohort
    ingest_extract(site_dir=site_dir, patients_csv=out / "site-2" / "patients.csv", events_csv=out / "site-2" / "events.csv")
    before = _tree_digest(site_dir)
    bad = tmp_path / "patients.csv"
    bad.write_text(mutate((out / "site-1" / "patients.csv").read_text()))
    with pytest.raises(IngestError) as info:
        ingest_extract(site_dir=site_dir, patients_csv=bad, events_csv=out / "site-1" / "events.csv")
    message = str(info.value)
    assert "patients.csv" in message and field in message
    assert "MRN" not in message and "1999-02-31" not in message
    assert _tree_digest(site_dir) == before


def test_events_of_unknown_patients_are_rejected(small_cohort, site_dir):
    _, out = small_cohort
    with pytest.raises(IngestError, match="not in the patients file"):
        ingest_extract(site_dir=site_dir, patients_csv=out / "site-1" / "patients.csv",
                       events_csv=out / "site-2" / "events.csv")
    assert open_store(get_settings(site_dir)).counts()["patients"] == 0


def test_world_readable_key_is_refused(small_cohort, site_dir):
    _, out = small_cohort
    os.chmod(site_dir / "secret.key", 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        ingest_extract(site_dir=site_dir, patients_csv=out / "site-1" / "patients.csv", events_csv=None)
