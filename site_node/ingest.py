"""Ingest a flat CSV extract (patients file + long events file) into anonymized records.

Identifiers are replaced by keyed pseudonyms and dates become days relative to the
enrolment (index) date before anything is stored; the index date itself is shifted by the
patient's keyed offset. Error messages name the file, row and field, never the value.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evoclone.federated.record import Arm, Outcomes, PatientRecord, event_json, record_json
from evoclone.privacy.pseudonym import Pseudonymizer, age_at, zip3

from .store import RecordPayload
from .units import CANONICAL, UnitError, convert, range_error

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
class _Part:
    """A run of whole lines of the events file: bytes [start, end) (end None: to the end), first line number."""

    start: int
    end: int | None
    first_line: int


@dataclass(frozen=True)
class _Context:
    """What validating any part of the events file needs (inherited by the forked worker processes)."""

    path: Path
    rename: dict[str, str]
    patients: PatientIndex
    bucket: int


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _plan_parts(path: Path, workers: int | None) -> list[_Part]:
    """Split the events file into up to `workers` runs of whole lines (the cores when None), one per worker
    process; a file under PARALLEL_MIN_BYTES, or holding a quote character anywhere (a quoted field may
    hold a line break, so a byte offset is not always the start of a row), is one part."""
    auto = workers is None
    workers = _default_workers() if auto else workers
    size = path.stat().st_size
    if workers < 2 or (auto and size < PARALLEL_MIN_BYTES):
        return [_Part(0, None, 2)]
    with path.open("rb") as f:
        header = len(f.readline())
        cuts = [header]
        for k in range(1, workers):  # the start of the first line at or after each k/workers of the file
            f.seek(max(header, size * k // workers) - 1)
            f.readline()
            if f.tell() > cuts[-1] and f.tell() < size:
                cuts.append(f.tell())
        if len(cuts) == 1:
            return [_Part(0, None, 2)]
        f.seek(0)
        lines, at, starts = 0, 0, {}
        pending = list(cuts)
        while block := f.read(1 << 23):
            if b'"' in block:
                return [_Part(0, None, 2)]
            while pending and pending[0] <= at + len(block):
                starts[pending[0]] = lines + block.count(b"\n", 0, pending[0] - at) + 1
                pending.pop(0)
            lines += block.count(b"\n")
            at += len(block)
    ends = [*cuts[1:], None]
    return [_Part(c, e, starts[c]) for c, e in zip(cuts, ends)]


class _LineRange(io.RawIOBase):
    """The events file's header line followed by bytes [start, end): one part, read as a file of its own."""

    def __init__(self, path: Path, part: _Part) -> None:
        self._f = path.open("rb")
        self._head = self._f.readline() if part.start > 0 else b""
        self._f.seek(part.start)
        self._left = None if part.end is None else part.end - part.start
        self.done = 0  # bytes of the part read so far

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        want = len(buffer) if self._left is None else min(len(buffer), self._left)
        data = self._f.read(want)
        self.done += len(data)
        if self._left is not None:
            self._left -= len(data)
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


def _validate_part(context: _Context, part: _Part, spool: "_Spool",
                   tick: Callable[[int], None] | None = None) -> list[IngestIssue]:
    """Validate one part of the events file chunk by chunk (bounded memory) into `spool`; its issues.
    `tick(bytes)` is told how much of the part was read after each chunk."""
    issues: list[IngestIssue] = []
    first = part.first_line
    source = context.path.name
    try:
        with _LineRange(context.path, part) as raw:
            chunks = pd.read_csv(io.BufferedReader(raw, 1 << 20), dtype=str, keep_default_na=False,
                                 encoding="utf-8", chunksize=EVENT_CHUNK)
            for chunk in chunks:
                chunk = chunk.rename(columns=context.rename) if context.rename else chunk
                issues += _events(chunk, source, context.patients, spool.add, first_line=first)
                first += len(chunk)
                if tick is not None:
                    tick(raw.done)
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        issues.append(IngestIssue(source, f"near line {first}", "-", f"not a readable UTF-8 CSV ({type(exc).__name__})"))
    return issues


_FORKED: tuple[_Context, Any] | None = None  # the parallel validation's context and byte counters, inherited by
# its forked workers (not pickled to each)


def _validate_to(k: int, part: _Part, path: Path) -> tuple[list[IngestIssue], int]:
    """(In worker process k) validate one part into a spool file of its own; its issues and events spooled."""
    assert _FORKED is not None
    context, done = _FORKED
    spool = _Spool(path, context.bucket)
    try:
        return _validate_part(context, part, spool, tick=lambda n: done.__setitem__(k, n)), spool.events
    finally:
        spool.close()


def _validate_in_parallel(context: _Context, parts: list[_Part], staged: "StagedRecords",
                          tick: Callable[[int], None] | None = None) -> list[IngestIssue]:
    """Validate the parts in worker processes, one spool each, attached to `staged` in file order (so each
    patient's events keep the extract's order); the issues in line order. `tick(bytes)`: the bytes of the
    file read so far, every 0.2 s."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    global _FORKED
    fork = multiprocessing.get_context("fork")
    paths = [staged.spool_path(k) for k in range(1, len(parts) + 1)]
    _FORKED = (context, fork.Array("q", len(parts), lock=False))
    try:
        with ProcessPoolExecutor(len(parts), mp_context=fork) as pool:
            futures = [pool.submit(_validate_to, k, part, path) for k, (part, path) in enumerate(zip(parts, paths))]
            while wait(futures, timeout=0.2, return_when=FIRST_EXCEPTION).not_done:
                if tick is not None:
                    tick(sum(_FORKED[1]))
            results = [f.result() for f in futures]
    finally:
        _FORKED = None
    issues: list[IngestIssue] = []
    for path, (found, events) in zip(paths, results):
        staged.attach(path, events)
        issues += found
    return issues


EVENT_CHUNK = 100_000
RECORD_BATCH = 2_000
PARALLEL_MIN_BYTES = 16 << 20  # smaller events files are validated in the calling process


class _Spool:
    """One spool file: validated events, each as its JSON, keyed by the patient's position in the extract.

    Events go to one table per run of `bucket` consecutive positions (the record batches read back
    together), appended in file order, so reading a batch back is one sequential scan of its table: no index
    to build, no random reads (an index over one table made reading back the largest cost at 100,000 patients).
    """

    def __init__(self, path: Path, bucket: int) -> None:
        import sqlite3

        self.db = sqlite3.connect(path, check_same_thread=False)  # read back in the store's sealing thread
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.bucket = bucket
        self.tables = {int(name[3:]) for (name,) in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'ev_%'")}
        self.events = 0

    def add(self, pos, days, code, value, unit) -> None:
        """Spool one validated chunk (patient positions, days, codes, values, units): each patient's events of
        the chunk as one row (count, JSON list items)."""
        rows = event_json(days.tolist(), code.tolist(), list(value), list(unit))
        order = np.argsort(pos, kind="stable")  # file order kept within each patient
        pos = pos[order]
        rows = [rows[i] for i in order.tolist()]
        starts = np.flatnonzero(np.diff(pos, prepend=-1)).tolist()
        ends = [*starts[1:], len(rows)]
        by_bucket: dict[int, list[tuple[int, int, str]]] = {}
        for lo, hi, p in zip(starts, ends, pos[starts].tolist()):
            by_bucket.setdefault(p // self.bucket, []).append((p, hi - lo, ",".join(rows[lo:hi])))
        with self.db:
            for b, items in by_bucket.items():
                if b not in self.tables:
                    self.db.execute(f"CREATE TABLE ev_{b} (p INTEGER, n INTEGER, j TEXT)")
                    self.tables.add(b)
                self.db.executemany(f"INSERT INTO ev_{b} VALUES (?, ?, ?)", items)
        self.events += len(rows)

    def read(self, b: int):
        """(position, number of events, their JSON list items) of bucket `b`, in file order."""
        return self.db.execute(f"SELECT p, n, j FROM ev_{b}") if b in self.tables else ()

    def close(self) -> None:
        self.db.close()


class StagedRecords:
    """Validated events spooled to private temporary SQLite files, read back per patient batch.

    Holds no identifier: events are keyed by the patient's position in the extract. Each event is spooled as
    its canonical JSON, written in bulk from the validated columns (`record.event_json`), so the records are
    serialized without building a pydantic object per event. Worker processes that validated parts of a large
    events file each leave a spool file, attached in file order. `payloads()` yields the records ready to seal
    (what the pipeline stores), iterating yields them as canonical records; both in extract order. Use as a
    context manager or close().
    """

    def __init__(self, base: dict[str, dict], *, site: str, pseudonymizer: Pseudonymizer) -> None:
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="evoclone-ingest-")
        self._order = list(base)
        self.bucket = RECORD_BATCH
        self.spool = _Spool(self.spool_path(0), self.bucket)
        self._spools = [self.spool]
        self._base = base
        self._site, self._pseudonymizer = site, pseudonymizer

    @property
    def events(self) -> int:
        return sum(s.events for s in self._spools)

    def spool_path(self, k: int) -> Path:
        return Path(self._dir.name) / f"staging-{k}.db"

    def attach(self, path: Path, events: int) -> None:
        """Read a worker's spool file after the ones attached before it."""
        spool = _Spool(path, self.bucket)
        spool.events = events
        self._spools.append(spool)

    def __len__(self) -> int:
        return len(self._order)

    def payloads(self) -> Iterator[RecordPayload]:
        """Each patient's record as its canonical JSON (the bytes `PatientRecord.model_dump_json()` writes); the
        per-patient part is validated by the record model, the events were validated column-wise."""
        for start in range(0, len(self._order), self.bucket):
            end = min(start + self.bucket, len(self._order))
            events: dict[int, list[str]] = {}
            counts: dict[int, int] = {}
            for spool in self._spools:  # in file order
                for p, n, j in spool.read(start // self.bucket):
                    events.setdefault(p, []).append(j)
                    counts[p] = counts.get(p, 0) + n
            for i in range(start, end):
                m = self._order[i]
                b = self._base[m]
                head = PatientRecord(patient_id=self._pseudonymizer.pseudonym(m), site=self._site,
                                     index_date=b["index_date"], baseline=b["baseline"], arm=Arm(b["arm"]),
                                     outcomes=Outcomes(**b["outcomes"]))
                yield RecordPayload(head.patient_id, head.site, counts.get(i, 0), record_json(head, events.get(i, [])))

    def __iter__(self) -> Iterator[PatientRecord]:
        for p in self.payloads():
            yield PatientRecord.model_validate_json(p.payload)

    def close(self) -> None:
        """Delete the spools."""
        for spool in self._spools:
            spool.close()
        self._dir.cleanup()

    def __enter__(self) -> "StagedRecords":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
