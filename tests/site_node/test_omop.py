"""OMOP CDM v5.4 CSV export ingest."""

import pytest
from typer.testing import CliRunner

from evoclone.cli.main import app
from evoclone.site_node.ingest import IngestError
from evoclone.site_node.pipeline import ingest_omop, open_store
from evoclone.site_node.settings import get_settings

PERSON = ("person_id,gender_concept_id,year_of_birth,month_of_birth,day_of_birth,race_concept_id,ethnicity_concept_id,"
          "person_source_value\n1001,8507,1950,3,14,8527,38003564,MRN00001001\n1002,8532,1962,,,8527,38003564,MRN00001002\n")
VISITS = ("visit_occurrence_id,person_id,visit_concept_id,visit_start_date,visit_end_date\n"
          "1,1001,9202,2020-01-10,2020-01-10\n2,1001,9202,2020-06-01,2020-06-01\n3,1002,9201,2021-02-02,2021-02-05\n")
MEAS = ("measurement_id,person_id,measurement_concept_id,measurement_date,value_as_number,unit_source_value,"
        "measurement_source_value\n1,1001,3028437,2020-01-10,3.0,mmol/L,13457-7\n2,1002,3004410,2021-02-02,6.1,%,4548-4\n"
        "3,1002,3020891,2021-02-03,37.1,,body temp free text\n")
COND = "condition_occurrence_id,person_id,condition_concept_id,condition_start_date\n1,1002,201826,2021-02-02\n"
DEATH = "person_id,death_date,cause_concept_id\n1001,2022-03-01,4306655\n"


def _export(tmp_path, **override):
    tables = {"person": PERSON, "visit_occurrence": VISITS, "measurement": MEAS, "condition_occurrence": COND,
              "death": DEATH, **override}
    d = tmp_path / "omop"
    d.mkdir(exist_ok=True)
    for name, text in tables.items():
        (d / f"{name}.csv").write_text(text)
    return d


def test_omop_export_becomes_canonical_records(site_dir, tmp_path):
    d = _export(tmp_path)
    counts = ingest_omop(site_dir=site_dir, paths=sorted(d.iterdir()))
    assert counts["patients"] == 2 and counts["events"] == 3 + 3 + 1 + 1
    recs = {r.baseline["sex"]: r for r in open_store(get_settings(site_dir)).records()}
    m = recs["M"]
    assert m.baseline["age"] == 69 and m.arm is None
    ldl = next(e for e in m.events if e.code == "13457-7")
    assert ldl.value == pytest.approx(116.01) and ldl.unit == "mg/dL" and ldl.time == 0
    assert any(e.code.startswith("OMOP:death") and e.time == 781 for e in m.events)
    f = recs["F"]
    assert any(e.code == "OMOP:measurement:3020891" for e in f.events)  # free-text source never kept
    blob = (site_dir / "site.db").read_bytes()
    assert b"body temp free text" not in blob and b"MRN00001001" not in blob


def test_bad_omop_exports(site_dir, tmp_path):
    bad_person = MEAS.replace("1,1001,3028437", "1,9999,3028437")
    for override, needle in (({"measurement": bad_person}, "not in the patients file"),
                             ({"person": "person_id,year_of_birth\n1,1950\n"}, "gender_concept_id"),
                             ({"measurement": MEAS.replace("3.0,mmol/L", "3.0,bananas")}, "not convertible")):
        d = _export(tmp_path, **override)
        with pytest.raises(IngestError, match=needle):
            ingest_omop(site_dir=site_dir, paths=sorted(d.iterdir()))
    assert open_store(get_settings(site_dir)).counts()["patients"] == 0


def test_cli_detects_omop(site_dir, tmp_path):
    d = _export(tmp_path)
    r = CliRunner().invoke(app, ["site", "ingest", str(d), "--site-dir", str(site_dir), "--json"])
    assert r.exit_code == 0, r.stderr
    assert '"patients": 2' in r.stdout
