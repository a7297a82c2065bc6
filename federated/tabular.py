"""Flat tables -> canonical records: one row per patient, plus an optional long table of events.

Pure: takes pandas DataFrames (the CLI reads the files). The patients table holds covariates,
the treatment column and the outcome columns; the events table holds `(patient_id, time, code,
value, unit)` with `time` in days relative to the index date (negative: history before it).

Rows are numbered from 0 in input order, header excluded, as `evoclone twins predict` numbers
its output. Errors name the row and column, never the value of an identifier.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .record import Arm, Event, Outcomes, PatientRecord

CONTROL_LABELS = frozenset({"0", "no", "false", "control", "placebo", "c"})
TREATMENT_LABELS = frozenset({"1", "yes", "true", "treatment", "treated", "active", "t"})
EVENT_ID = "patient_id"


@dataclass(frozen=True)
class OutcomeColumns:
    """Which columns hold the endpoint: time and event, or binary, or continuous (exactly one)."""

    time: str | None = None
    event: str | None = None
    binary: str | None = None
    continuous: str | None = None

    def __post_init__(self) -> None:
        if (self.time is None) != (self.event is None):
            raise ValueError("a time-to-event endpoint needs both a time column and an event column; give both")
        if sum(c is not None for c in (self.time, self.binary, self.continuous)) != 1:
            raise ValueError("give exactly one endpoint: time and event columns, a binary column "
                             "or a continuous column")

    @property
    def endpoint(self) -> str:
        """"time_to_event", "binary" or "continuous"."""
        return "time_to_event" if self.time else "binary" if self.binary else "continuous"

    @property
    def columns(self) -> tuple[str, ...]:
        """The outcome column names."""
        return tuple(c for c in (self.time, self.event, self.binary, self.continuous) if c is not None)


@dataclass
class TabularData:
    """Records built from a table, with what the model directory must remember about the table."""

    records: list[PatientRecord]
    covariates: list[str]
    arm_levels: dict = field(default_factory=dict)  # original treatment value -> Arm
    row_ids: list[int] = field(default_factory=list)  # input row of each record (every row is kept)
    missing_outcome: int = 0  # rows kept with no outcome (the trainer drops them)
    endpoint: str | None = None


def _show(v, width: int = 24) -> str:
    """A short one-line rendering of a cell value for an error message."""
    s = " ".join(str(v).split())
    return s if len(s) <= width else s[:width - 3] + "..."


def _key(v) -> str:
    """Canonical text of an id, so 17, 17.0 and "17" from differently typed files join."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def _label(v) -> str:
    """Canonical treatment label: lower-case text, 1.0 -> "1", True -> "true"."""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, float, np.integer, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip().lower()


def _first(mask) -> int:
    """Position of the first True."""
    return int(np.flatnonzero(np.asarray(mask))[0])


def _numbers(s: pd.Series, source: str, col: str, hint: str) -> np.ndarray:
    """A column as float64 with NaN for blanks; a cell that is not a number is an error."""
    values = pd.to_numeric(s, errors="coerce")
    bad = s.notna().to_numpy() & values.isna().to_numpy()
    if bad.any():
        i = _first(bad)
        raise ValueError(f"{source} row {i} column '{col}': {_show(s.iloc[i])!r} is not a number; {hint}")
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _require(frame: pd.DataFrame, columns: list[str], source: str) -> None:
    missing = [c for c in dict.fromkeys(columns) if c not in frame.columns]
    if missing:
        present = ", ".join(map(str, frame.columns)) or "none"
        raise ValueError(f"{source}: column(s) {', '.join(repr(c) for c in missing)} not found; "
                         f"columns present: {present}")


def _arms(s: pd.Series, source: str, col: str) -> tuple[list[Arm], dict]:
    """Map a treatment column to arms; returns one arm per row and original value -> Arm."""
    missing = s.isna().to_numpy()
    if missing.any():
        raise ValueError(f"{source} row {_first(missing)} column '{col}': treatment is missing; "
                         "give every row an arm (0/1, control/treatment)")
    values = s.tolist()
    labels = {v: _label(v) for v in dict.fromkeys(values)}
    known = {lb: Arm.CONTROL if lb in CONTROL_LABELS else Arm.TREATMENT
             for lb in labels.values() if lb in CONTROL_LABELS | TREATMENT_LABELS}
    distinct = sorted(set(labels.values()))
    if len(known) < len(distinct):
        if len(distinct) != 2:
            shown = ", ".join(_show(lb, 16) for lb in distinct[:6]) + (", ..." if len(distinct) > 6 else "")
            raise ValueError(f"{source}: column '{col}' has {len(distinct)} value{'s' * (len(distinct) != 1)} "
                             f"({shown}); the treatment column must have two arms")
        if known:  # one recognised label: the other value is the other arm
            (lb, arm), = known.items()
            other = next(x for x in distinct if x != lb)
            known[other] = Arm(1 - arm)
        else:  # two unrecognised labels: sorted order, first is control (recorded in arm_levels)
            known = {distinct[0]: Arm.CONTROL, distinct[1]: Arm.TREATMENT}
    levels = {v: known[lb] for v, lb in labels.items()}
    return [levels[v] for v in values], levels


def _patient_ids(patients: pd.DataFrame, id_column: str | None, source: str) -> tuple[list[str], dict[str, int]]:
    """Record ids (>= 8 characters) and, when there is an id column, id key -> row."""
    n = len(patients)
    if id_column is None:
        return [f"row-{i:08d}" for i in range(n)], {}
    s = patients[id_column]
    missing = s.isna().to_numpy()
    if missing.any():
        raise ValueError(f"{source} row {_first(missing)} column '{id_column}': id is missing; give every row an id")
    rows: dict[str, int] = {}
    for i, v in enumerate(s.tolist()):
        k = _key(v)
        if k in rows:
            raise ValueError(f"{source} row {i} column '{id_column}': duplicate id (first in row {rows[k]}); "
                             "ids must be unique")
        rows[k] = i
    # a join key for this process only, not a pseudonym: an unkeyed hash of an MRN can be
    # reversed by enumeration, so site ingest (keyed HMAC) is what makes data shareable
    return ["id-" + hashlib.sha256(k.encode()).hexdigest()[:16] for k in rows], rows


def _events(events: pd.DataFrame, rows: dict[str, int], id_column: str | None, source: str
            ) -> dict[int, list[Event]]:
    """Events grouped by patient row."""
    if id_column is None:
        raise ValueError(f"{source}: events need a patient id; name the patients column that the "
                         f"events' '{EVENT_ID}' refers to (id column)")
    id_col = EVENT_ID if EVENT_ID in events.columns else id_column
    _require(events, [id_col, "time", "code"], source)
    ids = events[id_col]
    missing = ids.isna().to_numpy()
    if missing.any():
        raise ValueError(f"{source} row {_first(missing)} column '{id_col}': id is missing; "
                         "every event needs its patient's id")
    who = [rows.get(_key(v), -1) for v in ids.tolist()]
    unknown = np.asarray(who) < 0
    if unknown.any():
        raise ValueError(f"{source} row {_first(unknown)} column '{id_col}': id not in the patients table; "
                         "every event needs a patient row")
    hint = "give days relative to the index date (negative: history)"
    t = _numbers(events["time"], source, "time", hint)
    bad = ~np.isfinite(t)
    if bad.any():
        raise ValueError(f"{source} row {_first(bad)} column 'time': time is blank or infinite; {hint}")
    codes = events["code"]
    blank = codes.isna().to_numpy() | (codes.astype(str).str.strip() == "").to_numpy()
    if blank.any():
        raise ValueError(f"{source} row {_first(blank)} column 'code': code is blank; give every event a code")
    if "value" in events.columns:
        val = _numbers(events["value"], source, "value", "leave it blank for events without a value")
        inf = np.isinf(val)
        if inf.any():
            raise ValueError(f"{source} row {_first(inf)} column 'value': value is infinite; fix or blank the cell")
    else:
        val = np.full(len(events), np.nan)
    units = events["unit"].tolist() if "unit" in events.columns else [None] * len(events)
    out: dict[int, list[Event]] = {}
    for r, ti, c, v, u in zip(who, t.tolist(), codes.astype(str).str.strip().tolist(), val.tolist(), units):
        unit = None if u is None or (isinstance(u, float) and math.isnan(u)) else str(u)
        out.setdefault(r, []).append(Event(time=ti, code=c, value=None if math.isnan(v) else v, unit=unit))
    return out


def _outcomes(patients: pd.DataFrame, outcome: OutcomeColumns | None, source: str) -> list[Outcomes | None]:
    """One Outcomes per row; None where the outcome is blank."""
    n = len(patients)
    if outcome is None:
        return [Outcomes()] * n

    def zero_one(col: str, what: str) -> np.ndarray:
        x = _numbers(patients[col], source, col, f"{what} must be 0 or 1")
        bad = ~np.isnan(x) & ~np.isin(x, (0.0, 1.0))
        if bad.any():
            raise ValueError(f"{source} row {_first(bad)} column '{col}': {what} must be 0 or 1; recode the column")
        return x

    if outcome.endpoint == "time_to_event":
        hint = "give days from the index date to the event or censoring"
        t = _numbers(patients[outcome.time], source, outcome.time, hint)
        bad = np.isinf(t) | (t < 0)
        if bad.any():
            raise ValueError(f"{source} row {_first(bad)} column '{outcome.time}': "
                             f"time must be finite and >= 0; {hint}")
        e = zero_one(outcome.event, "event (1 = event, 0 = censored)")
        return [None if math.isnan(ti) or math.isnan(ei) else Outcomes(time_to_event=ti, event=bool(ei))
                for ti, ei in zip(t.tolist(), e.tolist())]
    if outcome.endpoint == "binary":
        b = zero_one(outcome.binary, "the binary outcome")
        return [None if math.isnan(v) else Outcomes(binary=int(v)) for v in b.tolist()]
    c = _numbers(patients[outcome.continuous], source, outcome.continuous, "the continuous outcome must be a number")
    bad = np.isinf(c)
    if bad.any():
        raise ValueError(f"{source} row {_first(bad)} column '{outcome.continuous}': "
                         "outcome is infinite; fix or blank the cell")
    return [None if math.isnan(v) else Outcomes(continuous=v) for v in c.tolist()]


def _covariate(s: pd.Series, source: str, col: str) -> list[float | str | None]:
    """Numeric columns stay float (NaN -> None); anything else becomes text."""
    if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        x = s.to_numpy(dtype=np.float64, na_value=np.nan)
        inf = np.isinf(x)
        if inf.any():
            raise ValueError(f"{source} row {_first(inf)} column '{col}': value is infinite; "
                             "fix or blank the cell (blank = missing)")
        return [None if math.isnan(v) else v for v in x.tolist()]
    return [None if pd.isna(v) else str(v) for v in s.tolist()]


def records_from_frames(patients: pd.DataFrame, events: pd.DataFrame | None, *, treatment: str | None,
                        outcome: OutcomeColumns | None, covariates: list[str] | None, id_column: str | None = None,
                        site: str = "local", source: str = "<data>", events_source: str = "<events>") -> TabularData:
    """Build canonical records from a patients table (one row each) and an optional events table."""
    if id_column is None and EVENT_ID in patients.columns:
        id_column = EVENT_ID  # an id column is never a covariate
    reserved = [c for c in (id_column, treatment, *(outcome.columns if outcome else ())) if c is not None]
    if covariates is None:
        covariates = [c for c in patients.columns if c not in reserved]
    else:
        clash = [c for c in covariates if c in reserved]
        if clash:
            raise ValueError(f"{source}: column '{clash[0]}' is the id, treatment or outcome column; "
                             "leave it out of the covariates")
        covariates = list(dict.fromkeys(covariates))
    _require(patients, reserved + covariates, source)
    if len(patients) == 0:
        raise ValueError(f"{source}: no rows; the patients table needs one row per patient")
    patients = patients.reset_index(drop=True)
    ids, rows = _patient_ids(patients, id_column, source)
    arms, levels = _arms(patients[treatment], source, treatment) if treatment else ([None] * len(patients), {})
    outs = _outcomes(patients, outcome, source)
    columns = {c: _covariate(patients[c], source, c) for c in covariates}
    timeline = _events(events.reset_index(drop=True), rows, id_column, events_source) if events is not None else {}
    records = [PatientRecord(patient_id=ids[i], site=site, baseline={c: v[i] for c, v in columns.items()},
                             arm=arms[i], events=tuple(timeline.get(i, ())), outcomes=outs[i] or Outcomes())
               for i in range(len(patients))]
    return TabularData(records=records, covariates=list(covariates), arm_levels=levels,
                       row_ids=list(range(len(patients))), missing_outcome=sum(o is None for o in outs),
                       endpoint=outcome.endpoint if outcome else None)
