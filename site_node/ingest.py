"""Ingest a flat CSV extract (patients file + long events file) into anonymized records.

Identifiers are replaced by keyed pseudonyms and dates become days relative to the
enrolment (index) date before anything is stored; the index date itself is shifted by the
patient's keyed offset. Error messages name the file, row and field, never the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd

from evoclone.federated.record import Arm, Event, Outcomes, PatientRecord
from evoclone.privacy.pseudonym import Pseudonymizer, age_at, zip3

PATIENT_COLUMNS = ("mrn", "birth_date", "sex", "enrollment_date", "arm")
OPTIONAL_PATIENT_COLUMNS = ("bmi", "genotype", "diabetes", "hypertension", "ckd", "prior_mi", "zip",
                            "followup_end_date", "event", "response_wk24", "ldl_wk24")
EVENT_COLUMNS = ("mrn", "date", "code", "value", "unit")
# columns that identify a person and are dropped outright
DROPPED = ("name", "phone", "email", "ssn", "address")


@dataclass(frozen=True)
class IngestIssue:
    """One rejected row or field."""

    source: str
    location: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source} {self.location}: {self.field}: {self.reason}"


class IngestError(ValueError):
    """The batch was refused; nothing was stored."""

    def __init__(self, issues: list[IngestIssue]) -> None:
        self.issues = issues
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        super().__init__(f"{issues[0]}{more}; fix the extract and ingest again")


def _date(value: object) -> date:
    return date.fromisoformat(str(value).strip())


def _num(value: object) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    v = float(value)
    if not math.isfinite(v):
        raise ValueError("not a finite number")
    return v


def _read(path: Path, required: tuple[str, ...], issues: list[IngestIssue]) -> pd.DataFrame | None:
    if not path.is_file():
        issues.append(IngestIssue(path.name, "file", "-", "file not found"))
        return None
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        issues.append(IngestIssue(path.name, "file", "-", f"not a readable UTF-8 CSV ({type(exc).__name__})"))
        return None
    missing = [c for c in required if c not in df.columns]
    if missing:
        issues.append(IngestIssue(path.name, "header", ",".join(missing), "required column missing"))
        return None
    return df


def read_extract(patients_csv: Path, events_csv: Path | None, *, site: str,
                 pseudonymizer: Pseudonymizer) -> list[PatientRecord]:
    """Parse, validate and anonymize one extract; raise IngestError listing every bad row."""
    issues: list[IngestIssue] = []
    pat = _read(patients_csv, PATIENT_COLUMNS, issues)
    ev = _read(events_csv, EVENT_COLUMNS, issues) if events_csv is not None else None
    if pat is None or issues:
        raise IngestError(issues)
    src = patients_csv.name
    enrol_of: dict[str, date] = {}
    base: dict[str, dict] = {}
    seen: set[str] = set()
    for i, row in enumerate(pat.to_dict("records"), start=2):  # line 1 is the header
        loc = f"line {i}"
        mrn = row["mrn"].strip()
        if not mrn:
            issues.append(IngestIssue(src, loc, "mrn", "empty identifier"))
            continue
        if mrn in seen:
            issues.append(IngestIssue(src, loc, "mrn", "duplicate patient identifier"))
            continue
        seen.add(mrn)
        try:
            enrol = _date(row["enrollment_date"])
        except ValueError:
            issues.append(IngestIssue(src, loc, "enrollment_date", "not a date (YYYY-MM-DD)"))
            continue
        try:
            birth = _date(row["birth_date"])
            age = age_at(birth, enrol)
        except ValueError:
            issues.append(IngestIssue(src, loc, "birth_date", "not a date (YYYY-MM-DD) before enrolment"))
            continue
        if row["arm"].strip() not in ("0", "1"):
            issues.append(IngestIssue(src, loc, "arm", "must be 0 (control) or 1 (treatment)"))
            continue
        try:
            numbers = {c: _num(row.get(c)) for c in ("bmi", "diabetes", "hypertension", "ckd", "prior_mi",
                                                     "event", "response_wk24", "ldl_wk24")}
        except ValueError:
            bad = next(c for c in ("bmi", "diabetes", "hypertension", "ckd", "prior_mi", "event",
                                   "response_wk24", "ldl_wk24") if not _is_num(row.get(c)))
            issues.append(IngestIssue(src, loc, bad, "not a number"))
            continue
        outcomes = {}
        if row.get("followup_end_date", "").strip():
            try:
                end = _date(row["followup_end_date"])
            except ValueError:
                issues.append(IngestIssue(src, loc, "followup_end_date", "not a date (YYYY-MM-DD)"))
                continue
            if end < enrol:
                issues.append(IngestIssue(src, loc, "followup_end_date", "before the enrolment date"))
                continue
            outcomes["time_to_event"] = float((end - enrol).days)
            outcomes["event"] = bool(numbers["event"])
        if numbers["response_wk24"] is not None:
            outcomes["binary"] = int(numbers["response_wk24"])
        if numbers["ldl_wk24"] is not None:
            outcomes["continuous"] = numbers["ldl_wk24"]
        try:
            area = zip3(row["zip"]) if row.get("zip", "").strip() else None
        except ValueError:
            issues.append(IngestIssue(src, loc, "zip", "fewer than three digits"))
            continue
        enrol_of[mrn] = enrol
        base[mrn] = {
            "arm": int(row["arm"]), "outcomes": outcomes, "index_date": pseudonymizer.shift(enrol, mrn),
            "baseline": {"age": float(age), "sex": row["sex"].strip().upper()[:1] or None, "bmi": numbers["bmi"],
                         "genotype": row.get("genotype", "").strip() or None, "zip3": area,
                         **{c: numbers[c] for c in ("diabetes", "hypertension", "ckd", "prior_mi")}},
        }
    events: dict[str, list[Event]] = {m: [] for m in base}
    if ev is not None:
        esrc = events_csv.name
        for i, row in enumerate(ev.to_dict("records"), start=2):
            mrn = row["mrn"].strip()
            if mrn not in enrol_of:
                if mrn not in seen:
                    issues.append(IngestIssue(esrc, f"line {i}", "mrn", "event of a patient not in the patients file"))
                continue
            try:
                t = float((_date(row["date"]) - enrol_of[mrn]).days)
                value = _num(row["value"])
                events[mrn].append(Event(time=t, code=row["code"].strip(), value=value,
                                         unit=row["unit"].strip() or None))
            except ValueError as exc:
                field = "date" if "date" in str(exc).lower() or "isoformat" in str(exc) else "value/code"
                issues.append(IngestIssue(esrc, f"line {i}", field, "not a valid date, number or code"))
    if issues:
        raise IngestError(issues)
    return [PatientRecord(patient_id=pseudonymizer.pseudonym(m), site=site, index_date=b["index_date"],
                          baseline=b["baseline"], arm=Arm(b["arm"]), events=tuple(events[m]),
                          outcomes=Outcomes(**b["outcomes"]))
            for m, b in base.items()]


def _is_num(value: object) -> bool:
    try:
        _num(value)
        return True
    except (TypeError, ValueError):
        return False
