"""Validated events of an extract between validation and storage: the spool, and the worker processes.

A large events file is validated by one worker process per core, each taking a run of whole lines
(`_plan_parts`) into a spool of its own; the spools hold each patient's events as canonical JSON, keyed by
the patient's position in the extract (never an identifier), and `StagedRecords` reads them back in file
order as records ready to seal. `ingest.read_extract` drives it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evoclone.federated.record import Arm, Outcomes, PatientRecord, event_json, record_json
from evoclone.privacy.pseudonym import Pseudonymizer

from .inference import usable_cores
from .ingest import IngestIssue, PatientIndex, _events
from .store import RecordPayload


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


def _plan_parts(path: Path, workers: int | None) -> list[_Part]:
    """Split the events file into up to `workers` runs of whole lines (the cores when None), one per worker
    process; a file under PARALLEL_MIN_BYTES, or holding a quote character anywhere (a quoted field may
    hold a line break, so a byte offset is not always the start of a row), is one part."""
    auto = workers is None
    workers = usable_cores() if auto else workers
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
