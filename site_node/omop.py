"""OMOP CDM v5.4 ingest from CSV table exports (person, visit_occurrence, condition_occurrence,
drug_exposure, measurement, observation, procedure_occurrence, death).

Every clinical table becomes rows of one long events table (person, date, code, value,
unit), validated column-wise exactly like a flat CSV extract. The index date of a person
is their first visit (or earliest dated row); `person_id` is pseudonymized like any
identifier, and `*_source_value` free text is never stored.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pandas as pd

from evoclone.federated.record import PatientRecord
from evoclone.privacy.pseudonym import Pseudonymizer, age_at

from .ingest import IngestError, IngestIssue, PatientIndex, _events

GENDER = {"8507": "M", "8532": "F"}
LOINC = re.compile(r"^\d{1,7}-\d$")
# table -> (date column, concept column, value column or None)
CLINICAL = {
    "visit_occurrence": ("visit_start_date", "visit_concept_id", None),
    "condition_occurrence": ("condition_start_date", "condition_concept_id", None),
    "drug_exposure": ("drug_exposure_start_date", "drug_concept_id", None),
    "measurement": ("measurement_date", "measurement_concept_id", "value_as_number"),
    "observation": ("observation_date", "observation_concept_id", "value_as_number"),
    "procedure_occurrence": ("procedure_date", "procedure_concept_id", None),
    "death": ("death_date", "cause_concept_id", None),
}
PERSON_COLUMNS = ("person_id", "gender_concept_id", "year_of_birth")


def _table(files: dict[str, Path], name: str, required: tuple[str, ...], issues: list[IngestIssue]) -> pd.DataFrame | None:
    path = files.get(name)
    if path is None:
        return None
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        issues.append(IngestIssue(path.name, "file", "-", f"not a readable UTF-8 CSV ({type(exc).__name__})"))
        return None
    df.columns = [c.strip().lower() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        issues.append(IngestIssue(path.name, "header", ",".join(missing), "required OMOP column missing"))
        return None
    return df


def _birth(row: dict) -> date:
    y = int(row["year_of_birth"])
    m = int(row.get("month_of_birth") or 7)  # mid-year when only the year is known
    d = int(row.get("day_of_birth") or 1)
    return date(y, m, d)


def read_omop(paths: list[Path], *, site: str, pseudonymizer: Pseudonymizer) -> list[PatientRecord]:
    """Parse, validate and anonymize an OMOP CSV export; raise IngestError listing every problem."""
    files = {p.stem.lower(): p for p in paths}
    unknown = [p.name for p in paths if p.stem.lower() not in {"person", *CLINICAL}]
    issues: list[IngestIssue] = [IngestIssue(u, "file", "-", "not an OMOP CDM table this adapter reads") for u in unknown]
    person = _table(files, "person", PERSON_COLUMNS, issues)
    if person is None and not issues:
        issues.append(IngestIssue("person.csv", "file", "-", "the person table is required"))
    frames = []
    for name, (date_col, concept_col, value_col) in CLINICAL.items():
        df = _table(files, name, ("person_id", date_col), issues)
        if df is None:
            continue
        source = df.get(f"{name.split('_')[0]}_source_value", pd.Series([""] * len(df)))
        concept = df[concept_col] if concept_col in df.columns else pd.Series(["0"] * len(df))
        # a LOINC source code keeps lab values comparable with FHIR and CSV extracts
        code = [s if name == "measurement" and LOINC.match(s or "") else f"OMOP:{name}:{c}"
                for s, c in zip(source.fillna(""), concept.fillna("0"))]
        frames.append((name, pd.DataFrame({
            "mrn": df["person_id"], "date": df[date_col].str[:10], "code": code,
            "value": df[value_col] if value_col and value_col in df.columns else "",
            "unit": df["unit_source_value"] if name == "measurement" and "unit_source_value" in df.columns else ""})))
    if person is None or issues:
        raise IngestError(issues)
    base, birth_of, index_of, seen = {}, {}, {}, set()
    first_dates: dict[str, str] = {}
    for _, f in frames:
        for pid, d in zip(f["mrn"], f["date"]):
            if d and (pid not in first_dates or d < first_dates[pid]):
                first_dates[pid] = d
    visits = dict(frames).get("visit_occurrence")
    first_visit = visits.groupby("mrn")["date"].min().to_dict() if visits is not None and len(visits) else {}
    for i, row in enumerate(person.to_dict("records"), start=2):
        pid = row["person_id"].strip()
        loc = f"line {i}"
        if not pid or pid in seen:
            issues.append(IngestIssue("person.csv", loc, "person_id", "empty or duplicate person_id"))
            continue
        seen.add(pid)
        try:
            birth = _birth(row)
        except ValueError:
            issues.append(IngestIssue("person.csv", loc, "year_of_birth", "not a valid birth date"))
            continue
        first = first_visit.get(pid) or first_dates.get(pid)
        if first is None:
            issues.append(IngestIssue("person.csv", loc, "person_id", "no dated rows for this person"))
            continue
        try:
            index = date.fromisoformat(first)
            age = age_at(birth, index)
        except ValueError:
            issues.append(IngestIssue("person.csv", loc, "year_of_birth", "birth after the first visit, or bad date"))
            continue
        birth_of[pid], index_of[pid] = birth, index
        base[pid] = {"age": float(age), "sex": GENDER.get(row["gender_concept_id"].strip())}
    events: dict[str, list[dict]] = {pid: [] for pid in base}
    patients = PatientIndex.of(list(index_of), index_of, birth_of, seen)
    for name, f in frames:
        issues += _events(f, f"{name}.csv", patients, events)
    if issues:
        raise IngestError(issues)
    return [PatientRecord(patient_id=pseudonymizer.pseudonym(pid), site=site, index_date=pseudonymizer.shift(index_of[pid], pid),
                          baseline=b, arm=None, events=tuple(events[pid])) for pid, b in base.items()]
