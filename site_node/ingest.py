"""Ingest a flat CSV extract (patients file + long events file) into anonymized records.

Identifiers are replaced by keyed pseudonyms and dates become days relative to the
enrolment (index) date before anything is stored; the index date itself is shifted by the
patient's keyed offset. Error messages name the file, row and field, never the value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from evoclone.privacy.pseudonym import Pseudonymizer, age_at, zip3

from .units import CANONICAL, UnitError, convert, range_error

if TYPE_CHECKING:
    from .staging import StagedRecords

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


def _read(path: Path, required: tuple[str, ...], issues: list[IngestIssue], *, known: tuple[str, ...] = (),
          rename: dict[str, str] | None = None, nrows: int | None = None) -> pd.DataFrame | None:
    if not path.is_file():
        issues.append(IngestIssue(path.name, "file", "-", "file not found"))
        return None
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", nrows=nrows)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        issues.append(IngestIssue(path.name, "file", "-", f"not a readable UTF-8 CSV ({type(exc).__name__})"))
        return None
    if rename:
        df = df.rename(columns={theirs: ours for ours, theirs in rename.items()})
    missing = [c for c in required if c not in df.columns]
    if missing:
        issues.append(IngestIssue(path.name, "header", ",".join(missing), "required column missing; "
                                  "map it with --mapping if it has another name"))
        return None
    extra = [c for c in df.columns if c not in (*required, *known)]
    if extra:
        issues.append(IngestIssue(path.name, "header", ",".join(extra), "unknown column; map or remove it"))
        return None
    if df.empty:
        issues.append(IngestIssue(path.name, "file", "-", "no data rows"))
        return None
    return df


def load_mapping(path: Path | None) -> dict[str, dict[str, str]]:
    """A YAML mapping {patients: {our_name: their_name}, events: {...}}; empty when no file."""
    if path is None:
        return {}
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not a readable YAML mapping ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or not set(doc) <= {"patients", "events"} or \
            not all(isinstance(v, dict) for v in doc.values()):
        raise ValueError(f"{path}: mapping must have 'patients' and/or 'events' sections of column: name pairs")
    return {k: {str(a): str(b) for a, b in v.items()} for k, v in doc.items()}


def read_extract(patients_csv: Path, events_csv: Path | None, *, site: str, pseudonymizer: Pseudonymizer,
                 mapping: dict[str, dict[str, str]] | None = None, allow_partial: bool = False,
                 workers: int | None = None, progress: Callable[[str, int, int], None] | None = None
                 ) -> tuple["StagedRecords", list[IngestIssue]]:
    """Parse, validate and anonymize one extract.

    Returns the good records (a StagedRecords to iterate and close) and the issues of the
    rows left out; without `allow_partial`
    any issue raises IngestError instead (the batch is all or nothing). File-level
    problems (unreadable file, missing or unknown columns) always raise. A large events file
    is validated by `workers` processes (default: one per core), each taking a run of whole
    lines; the records and issues are the same as with one. `progress(phase, done, total)` is
    told the bytes of the events file validated so far.
    """
    mapping = mapping or {}
    issues: list[IngestIssue] = []
    pat = _read(patients_csv, PATIENT_COLUMNS, issues, known=(*OPTIONAL_PATIENT_COLUMNS, *DROPPED, "name"),
                rename=mapping.get("patients"))
    ev_head = _read(events_csv, EVENT_COLUMNS, issues, known=(), rename=mapping.get("events"), nrows=1) \
        if events_csv else None
    if pat is None or issues:
        raise IngestError(issues)
    src = patients_csv.name
    enrol_of: dict[str, date] = {}
    birth_of: dict[str, date] = {}
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
        if enrol > date.today():
            issues.append(IngestIssue(src, loc, "enrollment_date", "in the future"))
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
        birth_of[mrn] = birth
        base[mrn] = {
            "arm": int(row["arm"]), "outcomes": outcomes, "index_date": pseudonymizer.shift(enrol, mrn),
            "baseline": {"age": float(age), "sex": row["sex"].strip().upper()[:1] or None, "bmi": numbers["bmi"],
                         "genotype": row.get("genotype", "").strip() or None, "zip3": area,
                         **{c: numbers[c] for c in ("diabetes", "hypertension", "ckd", "prior_mi")}},
        }
    from .staging import StagedRecords, _Context, _plan_parts, _validate_in_parallel, _validate_part

    staged = StagedRecords(base, site=site, pseudonymizer=pseudonymizer)
    try:
        if ev_head is not None:
            rename = {theirs: ours for ours, theirs in (mapping.get("events") or {}).items()}
            parts = _plan_parts(events_csv, workers)
            context = _Context(events_csv, rename, PatientIndex.of(list(base), enrol_of, birth_of, seen),
                               staged.bucket)
            size = events_csv.stat().st_size
            tick = None if progress is None else (lambda n: progress("validating events", n, size))
            if len(parts) == 1:
                issues += _validate_part(context, parts[0], staged.spool, tick)
            else:
                issues += _validate_in_parallel(context, parts, staged, tick)
            if tick is not None:
                tick(size)
        if issues and not allow_partial:
            raise IngestError(issues)
    except BaseException:
        staged.close()
        raise
    return staged, issues


@dataclass(frozen=True)
class PatientIndex:
    """An extract's accepted patients, for the column-wise checks of its events: their identifiers in extract
    order (an event's patient position), enrolment and birth dates; and every identifier of the patients file,
    accepted or not (an event of a rejected patient is not also an event of an unknown one). Built once per
    extract, not per chunk of events."""

    ids: pd.Index
    enrol: np.ndarray
    birth: np.ndarray
    seen: frozenset[str]

    @classmethod
    def of(cls, order: list[str], enrol_of: dict[str, date], birth_of: dict[str, date], seen: set[str]
           ) -> "PatientIndex":
        return cls(pd.Index(order), np.array([enrol_of[m] for m in order], dtype="datetime64[D]"),
                   np.array([birth_of[m] for m in order], dtype="datetime64[D]"), frozenset(seen))


def _events(ev: pd.DataFrame, src: str, patients: PatientIndex, out, *, first_line: int = 2) -> list[IngestIssue]:
    """Validate and convert (a chunk of) the long events table column-wise.

    `out` is a dict of per-patient lists (by identifier), or a callable taking the validated columns
    (patient position in `patients`, days, code, value, unit) for chunked, bounded-memory ingest.
    """
    found: list[tuple[int, IngestIssue]] = []

    def flag(mask, field: str, reason) -> None:
        for line, r in zip(lines[mask], reason if not isinstance(reason, str) else [reason] * int(mask.sum())):
            found.append((int(line), IngestIssue(src, f"line {line}", field, r)))

    lines = np.arange(len(ev)) + first_line  # line 1 is the header
    mrn = ev["mrn"].str.strip().to_numpy()
    index = patients.ids.get_indexer(mrn)
    known = index >= 0
    unknown = ~known
    unknown[unknown] = [m not in patients.seen for m in mrn[unknown]]
    flag(unknown, "mrn", "event of a patient not in the patients file")
    ev, lines, mrn, index = ev[known], lines[known], mrn[known], index[known]
    raw_date = ev["date"].str.strip().to_numpy()
    day = pd.to_datetime(raw_date, format="%Y-%m-%d", errors="coerce").to_numpy().astype("datetime64[D]")
    for i in np.flatnonzero(np.isnat(day)):  # outside pandas' nanosecond range, or not a date
        try:
            day[i] = np.datetime64(date.fromisoformat(raw_date[i]), "D")
        except ValueError:
            pass
    bad_date = np.isnat(day)
    flag(bad_date, "date", "not a date (YYYY-MM-DD)")
    enrol, birth = patients.enrol[index], patients.birth[index]
    today = np.datetime64(date.today())
    future = ~bad_date & (day > today)
    before_birth = ~bad_date & ~future & (day < birth)
    flag(future, "date", "in the future")
    flag(before_birth, "date", "before birth")
    code = ev["code"].str.strip().to_numpy()
    flag(code == "", "code", "empty code")
    raw_value = ev["value"].str.strip()
    value = pd.to_numeric(raw_value, errors="coerce").to_numpy(dtype=float)
    not_number = np.isnan(value) & (raw_value != "").to_numpy()
    flag(not_number, "value", "not a number")
    infinite = np.isinf(value)  # pandas reads "inf" and "-Infinity" as numbers
    flag(infinite, "value", "not a finite number")
    unit = ev["unit"].str.strip().to_numpy().astype(object)
    unit[unit == ""] = None
    ok = ~(bad_date | future | before_birth | (code == "") | not_number | infinite)
    unit_bad = np.zeros(len(ev), dtype=bool)
    for c, u in set(zip(code[ok], unit[ok])):
        if c not in CANONICAL:
            continue
        rows = ok & (code == c) & (unit == u) & ~np.isnan(value)
        try:
            converted, canonical, in_range = convert(c, u, value[rows])
        except UnitError as exc:
            flag(rows, "value", str(exc))
            unit_bad |= rows
            continue
        value[rows] = converted
        unit[rows] = canonical
        out_of_range = rows.copy()
        out_of_range[rows] = ~in_range
        flag(out_of_range, "value", range_error(c))
        unit_bad |= out_of_range
    ok &= ~unit_bad
    days = ((day[ok] - enrol[ok]) / np.timedelta64(1, "D")).astype(float)
    values = value[ok].astype(object)
    values[np.isnan(value[ok])] = None
    if callable(out):
        out(index[ok], days, code[ok], values, unit[ok])
    else:
        for m, t, c, v, u in zip(mrn[ok], days.tolist(), code[ok], values, unit[ok]):
            out[m].append({"time": t, "code": c, "value": v, "unit": u})  # validated in pydantic's core
    return [issue for _, issue in sorted(found, key=lambda x: x[0])]


def _is_num(value: object) -> bool:
    try:
        _num(value)
        return True
    except (TypeError, ValueError):
        return False
