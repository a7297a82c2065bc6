"""CSV extracts: column mapping, row-level validation, partial ingest with quarantine."""

import pandas as pd
import pytest

from evoclone.site_node.ingest import IngestError
from evoclone.site_node.pipeline import ingest_extract, open_store
from evoclone.site_node.settings import get_settings


def _copy(small_cohort, tmp_path, site="site-1"):
    _, out = small_cohort
    pat = pd.read_csv(out / site / "patients.csv", dtype=str, keep_default_na=False)
    ev = pd.read_csv(out / site / "events.csv", dtype=str, keep_default_na=False)
    return pat, ev


def _write(tmp_path, pat, ev):
    pat.to_csv(tmp_path / "patients.csv", index=False)
    ev.to_csv(tmp_path / "events.csv", index=False)
    return tmp_path / "patients.csv", tmp_path / "events.csv"


def test_mapping_file_renames_columns(small_cohort, site_dir, tmp_path):
    pat, ev = _copy(small_cohort, tmp_path)
    pat = pat.rename(columns={"mrn": "patient_id", "birth_date": "dob"})
    ev = ev.rename(columns={"mrn": "patient_id", "date": "obs_date"})
    p, e = _write(tmp_path, pat, ev)
    with pytest.raises(IngestError, match="required column missing"):
        ingest_extract(site_dir=site_dir, patients_csv=p, events_csv=e)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("patients:\n  mrn: patient_id\n  birth_date: dob\nevents:\n  mrn: patient_id\n  date: obs_date\n")
    counts = ingest_extract(site_dir=site_dir, patients_csv=p, events_csv=e, mapping_file=mapping)
    assert counts["patients"] == len(pat) and counts["rejected"] == 0


def test_unknown_column_is_refused(small_cohort, site_dir, tmp_path):
    pat, ev = _copy(small_cohort, tmp_path)
    pat["favourite_colour"] = "blue"
    p, e = _write(tmp_path, pat, ev)
    with pytest.raises(IngestError, match="favourite_colour: unknown column"):
        ingest_extract(site_dir=site_dir, patients_csv=p, events_csv=e)


def test_units_converted_and_ranges_checked(small_cohort, site_dir, tmp_path):
    pat, ev = _copy(small_cohort, tmp_path)
    ldl = ev.index[ev["code"] == "13457-7"][0]
    ev.loc[ldl, ["value", "unit"]] = ["3.0", "mmol/L"]  # 116.01 mg/dL
    p, e = _write(tmp_path, pat, ev)
    ingest_extract(site_dir=site_dir, patients_csv=p, events_csv=e)
    values = [ev_.value for r in open_store(get_settings(site_dir)).records() for ev_ in r.events
              if ev_.code == "13457-7" and ev_.unit == "mg/dL"]
    assert 116.01 in values

    for value, unit, reason in (("900", "mg/dL", "physiological range"), ("3", "furlongs", "not convertible"),
                                ("abc", "mg/dL", "not a number")):
        bad = ev.copy()
        bad.loc[ldl, ["value", "unit"]] = [value, unit]
        p, e = _write(tmp_path, pat, bad)
        with pytest.raises(IngestError, match=reason) as info:
            ingest_extract(site_dir=site_dir, patients_csv=p, events_csv=e)
        assert f"line {ldl + 2}" in str(info.value)


def test_an_infinite_value_of_any_code_is_refused_with_its_line_and_nothing_stored(small_cohort, site_dir, tmp_path):
    pat, ev = _copy(small_cohort, tmp_path)
    for value in ("inf", "-Infinity"):  # a local code has no physiological range that would catch it
        bad = ev.copy()
        bad.loc[7, ["code", "value", "unit"]] = ["LOCAL-SCORE", value, ""]
        p, e = _write(tmp_path, pat, bad)
        with pytest.raises(IngestError, match="line 9: value: not a finite number"):
            ingest_extract(site_dir=site_dir, patients_csv=p, events_csv=e)
        assert open_store(get_settings(site_dir)).counts()["patients"] == 0


def test_dates_in_future_or_before_birth(small_cohort, site_dir, tmp_path):
    pat, ev = _copy(small_cohort, tmp_path)
    for when, reason in (("2999-01-01", "in the future"), ("1900-01-01", "before birth")):
        bad = ev.copy()
        bad.loc[0, "date"] = when
        p, e = _write(tmp_path, pat, bad)
        with pytest.raises(IngestError, match=reason):
            ingest_extract(site_dir=site_dir, patients_csv=p, events_csv=e)


def test_allow_partial_quarantines_bad_rows_without_their_content(small_cohort, site_dir, tmp_path):
    pat, ev = _copy(small_cohort, tmp_path)
    pat.loc[3, "birth_date"] = "not-a-date"
    ev.loc[5, "value"] = "99999"
    p, e = _write(tmp_path, pat, ev)
    with pytest.raises(IngestError):
        ingest_extract(site_dir=site_dir, patients_csv=p, events_csv=e)
    assert open_store(get_settings(site_dir)).counts() == {"patients": 0, "events": 0, "quarantined": 0}
    counts = ingest_extract(site_dir=site_dir, patients_csv=p, events_csv=e, allow_partial=True)
    assert counts["rejected"] >= 2 and counts["quarantined"] == counts["rejected"]
    assert counts["patients"] == len(pat) - 1
    assert {x["field"] for x in counts["errors"]} >= {"birth_date", "value"}
    db = (site_dir / "site.db").read_bytes()
    assert b"not-a-date" not in db and pat.loc[3, "mrn"].encode() not in db


def test_empty_file_is_refused(site_dir, tmp_path):
    (tmp_path / "patients.csv").write_text("")
    with pytest.raises(IngestError, match="patients.csv"):
        ingest_extract(site_dir=site_dir, patients_csv=tmp_path / "patients.csv", events_csv=None)


def test_chunked_ingest_matches_and_reports_lines_across_chunks(small_cohort, tmp_path, monkeypatch):
    import evoclone.site_node.staging as staging
    from evoclone.site_node.settings import init_site

    _, out = small_cohort
    whole = tmp_path / "whole"
    init_site(whole, name="s")
    ingest_extract(site_dir=whole, patients_csv=out / "site-1" / "patients.csv", events_csv=out / "site-1" / "events.csv")
    monkeypatch.setattr(staging, "EVENT_CHUNK", 997)
    monkeypatch.setattr(staging, "RECORD_BATCH", 7)
    chunked = tmp_path / "chunked"
    chunked.mkdir()
    import shutil

    for f in ("secret.key", "master.keys", "site.json"):  # same keys: same pseudonyms and shifts
        shutil.copy2(whole / f, chunked / f)
    get_settings.cache_clear()
    ingest_extract(site_dir=chunked, patients_csv=out / "site-1" / "patients.csv", events_csv=out / "site-1" / "events.csv")
    a = open_store(get_settings(whole)).records()
    b = open_store(get_settings(chunked)).records()
    assert [r.model_dump() for r in a] == [r.model_dump() for r in b]

    pat, ev = _copy(small_cohort, tmp_path)
    ev.loc[2500, "value"] = "abc"  # in the third chunk
    p, e = _write(tmp_path, pat, ev)
    with pytest.raises(IngestError, match="line 2502: value"):
        ingest_extract(site_dir=chunked, patients_csv=p, events_csv=e)


def test_worker_processes_give_the_same_records_and_issues_as_one(small_cohort, tmp_path):
    """A large events file is validated in parts by worker processes (forced here on a small one): each patient's
    events keep the extract's order across parts, and every issue keeps its file line."""
    from evoclone.privacy.pseudonym import Pseudonymizer
    from evoclone.site_node.ingest import read_extract

    pat, ev = _copy(small_cohort, tmp_path)
    n = len(ev)
    ev.loc[3, "value"] = "abc"
    ev.loc[n // 2, "date"] = "2099-01-01"
    ev.loc[n // 2 + 1, "mrn"] = "NOBODY"
    ev.loc[n - 1, "code"] = ""
    p, e = _write(tmp_path, pat, ev)
    pseudonymizer = Pseudonymizer(key=b"k" * 32)

    def run(workers):
        staged, issues = read_extract(p, e, site="s", pseudonymizer=pseudonymizer, allow_partial=True,
                                      workers=workers)
        with staged:
            return [x.payload for x in staged.payloads()], [vars(i) for i in issues], staged.events, \
                len(staged._spools)

    one = run(1)
    assert one[3] == 1 and [(i["location"], i["field"]) for i in one[1]] == [
        ("line 5", "value"), (f"line {n // 2 + 2}", "date"), (f"line {n // 2 + 3}", "mrn"), (f"line {n + 1}", "code")]
    for workers in (2, 3):
        many = run(workers)
        assert many[3] == workers + 1  # the caller's (empty) spool and one per worker
        assert many[:3] == one[:3]


def test_a_file_with_quotes_is_validated_in_one_part(tmp_path):
    """A quoted field may hold a line break, so a byte offset is not always a row's start: one process reads it."""
    from evoclone.site_node.staging import _plan_parts

    plain = tmp_path / "plain.csv"
    plain.write_text("mrn,date,code,value,unit\n" + "".join(f"M{i},2020-01-01,c,1,u\n" for i in range(1000)))
    parts = _plan_parts(plain, 3)
    assert len(parts) == 3 and parts[0].first_line == 2
    lines = plain.read_bytes()
    for part in parts:  # each part starts at a line start, with the line number counted from the file
        assert lines[part.start - 1:part.start] == b"\n"
        assert lines[:part.start].count(b"\n") + 1 == part.first_line
    quoted = tmp_path / "quoted.csv"
    quoted.write_text(plain.read_text().replace("M999,2020-01-01,c,1,u", 'M999,2020-01-01,"c\nd",1,u'))
    assert len(_plan_parts(quoted, 3)) == 1
    assert len(_plan_parts(plain, None)) == 1  # small files: the calling process


def test_ingest_reports_its_progress_per_phase(small_cohort, site_dir, tmp_path):
    """Bytes of the events file validated (in one process or in workers), then patients stored: each phase's
    figures only go up and end at its total (the CLI draws them as progress bars)."""
    from evoclone.privacy.pseudonym import Pseudonymizer
    from evoclone.site_node.ingest import read_extract

    _, out = small_cohort
    p, e = out / "site-1" / "patients.csv", out / "site-1" / "events.csv"
    for workers in (1, 2):
        seen: list[tuple[str, int, int]] = []
        staged, _ = read_extract(p, e, site="s", pseudonymizer=Pseudonymizer(key=b"k" * 32), workers=workers,
                                 progress=lambda *a: seen.append(a))
        staged.close()
        assert {phase for phase, _, _ in seen} == {"validating events"}
        done = [d for _, d, _ in seen]
        assert done == sorted(done) and done[-1] == e.stat().st_size and {t for _, _, t in seen} == {done[-1]}
    seen = []
    counts = ingest_extract(site_dir=site_dir, patients_csv=p, events_csv=e, progress=lambda *a: seen.append(a))
    stored = [(d, t) for phase, d, t in seen if phase == "storing patients"]
    assert stored[-1] == (counts["accepted"], counts["accepted"]) and counts["accepted"] > 0
    assert [phase for phase, _, _ in seen].index("storing patients") > 0  # after the validation
