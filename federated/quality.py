"""Quality gate for generated twins, and regeneration under the constraints a failure teaches.

Every twin is checked: well-formed (grammar replay), decodable, times increasing within
the horizon, values inside physiological ranges, first values consistent with the
patient's own last measurement, and nothing after the terminal outcome. A failing twin
is regenerated with bans derived from its failure (the offending value bins), up to K
tries; twins that never pass are returned separately with their reasons, never mixed in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .generation import SamplingConfig, sample
from .grammar import Constraints, is_well_formed
from .models.twin_gpt import TwinGPT
from .record import Arm, Event, Outcomes, PatientRecord
from .tokenizer import DecodeError, EventTokenizer

# plausible adult ranges in canonical units (LOINC code -> (low, high)); values outside
# are not physiology but generation errors. Codes not listed use the vocabulary's range
# widened by half its width on each side.
PHYSIOLOGICAL_RANGES: dict[str, tuple[float, float]] = {
    "13457-7": (10.0, 500.0),  # LDL cholesterol, mg/dL
    "2093-3": (50.0, 600.0),  # total cholesterol, mg/dL
    "4548-4": (3.0, 20.0),  # HbA1c, %
    "33914-3": (2.0, 200.0),  # eGFR, mL/min/1.73m2
    "1988-5": (0.05, 500.0),  # CRP, mg/L
    "8480-6": (60.0, 260.0),  # systolic blood pressure, mm[Hg]
    "8462-4": (30.0, 150.0),  # diastolic blood pressure, mm[Hg]
    "2345-7": (20.0, 800.0),  # glucose, mg/dL
    "39156-5": (10.0, 80.0),  # BMI, kg/m2
}
CONSISTENCY_SD = 4.0  # allowed jump of a first future value, in robust SDs of that code...
DRIFT_SD_PER_YEAR = 2.0  # ...plus this many per year since the last measurement


@dataclass(frozen=True)
class QualityReport:
    """Gate verdict: pass/fail, a score in [0, 1], reasons, and bans for a retry."""

    passed: bool
    score: float
    reasons: tuple[str, ...] = ()
    constraints: Constraints = field(default_factory=Constraints)


@dataclass(frozen=True)
class Twin:
    """A generated twin that passed the gate."""

    row: int  # index of the conditioning patient in the input
    copy: int
    arm: Arm
    record: PatientRecord  # the patient's baseline and history, then the generated future
    quality: float
    tries: int


@dataclass(frozen=True)
class FailedTwin:
    """A twin that failed every try; reported, never returned as a twin."""

    row: int
    copy: int
    arm: Arm
    tries: int
    reasons: tuple[str, ...]


def value_range(tok: EventTokenizer, code: str) -> tuple[float, float]:
    """Physiological range of a code: the table, else the vocabulary's range widened."""
    if code in PHYSIOLOGICAL_RANGES:
        return PHYSIOLOGICAL_RANGES[code]
    c = tok.codes[code]
    w = c.hi - c.lo
    return c.lo - 0.5 * w, c.hi + 0.5 * w


def check_twin(tok: EventTokenizer, patient: PatientRecord, future: list[int], *, max_new: int) -> QualityReport:
    """Run every check on one generated future of `patient`."""
    ok, why = is_well_formed(tok, future, max_new)
    if not ok:
        return QualityReport(False, 0.0, (f"ill-formed: {why}",))
    try:
        dec = tok.decode_future([t for t in future if t not in (tok.eos_id, tok.pad_id)])
    except DecodeError as exc:
        return QualityReport(False, 0.0, (f"undecodable: {exc}",))
    reasons: list[str] = []
    banned: set[int] = set()
    first_banned: set[int] = set()
    checks = 0.0
    failed = 0.0
    # times strictly increase between visits and stay within the horizon
    times = sorted({e.time for e in dec.events})
    checks += 1
    time_reasons = []
    if any(t <= 0 or t > tok.spec.horizon_days for t in times) or dec.time > tok.spec.horizon_days:
        time_reasons.append("times outside (0, horizon]")
    if times and dec.status != "end" and dec.time < times[-1]:
        time_reasons.append("outcome before the last visit")
    failed += bool(time_reasons)
    reasons += time_reasons
    # physiological ranges
    valued = [e for e in dec.events if e.value is not None]
    checks += 1
    bad = [e for e in valued if not value_range(tok, e.code)[0] <= e.value <= value_range(tok, e.code)[1]]
    if bad:
        failed += len(bad) / len(valued)
        for e in bad[:3]:
            reasons.append(f"{e.code} value {e.value:g} outside the physiological range {value_range(tok, e.code)}")
        for e in bad:
            lo, hi = value_range(tok, e.code)
            banned |= {v for i, v in enumerate(tok.value_ids[e.code]) if not lo <= tok.value_of(e.code, i) <= hi}
    # consistency with the patient's own last measurement before the index
    last = {}
    for e in patient.history(until=0.0):
        if e.value is not None and e.code in tok.value_ids:
            last[e.code] = (e.time, e.value)
    first = {}
    for e in sorted(valued, key=lambda e: e.time):
        first.setdefault(e.code, e)
    checks += 1
    jumps = []
    for code, e in first.items():
        if code not in last:
            continue
        t0, v0 = last[code]
        scale = tok.codes[code].scale
        allow = scale * (CONSISTENCY_SD + DRIFT_SD_PER_YEAR * (e.time - t0) / 365.0)
        if abs(e.value - v0) > allow:
            jumps.append(code)
            reasons.append(f"{code} jumps from {v0:g} to {e.value:g} by day {e.time:g} (allowed +/-{allow:.3g})")
            first_banned |= {v for i, v in enumerate(tok.value_ids[code])
                             if abs(tok.value_of(code, i) - v0) > allow}
    if first:
        failed += len(jumps) / len(first)
    # nothing after the terminal outcome: the decoder stops at it, so any real token after is a violation
    checks += 1
    tail = future[future.index(tok.eos_id) + 1:] if tok.eos_id in future else []
    if any(t != tok.pad_id for t in tail):
        failed += 1
        reasons.append("tokens after the terminal outcome")
    score = max(0.0, 1.0 - failed / checks)
    return QualityReport(not reasons, round(score, 4), tuple(reasons),
                         Constraints(frozenset(banned), frozenset(first_banned)))


def twin_record(patient: PatientRecord, tok: EventTokenizer, future: list[int], arm: Arm, copy: int) -> PatientRecord:
    """The twin as a record: the patient's baseline and history, then the generated future."""
    dec = tok.decode_future([t for t in future if t not in (tok.eos_id, tok.pad_id)])
    history = tuple(e for e in patient.events if e.time <= 0)
    outcomes = Outcomes(time_to_event=dec.time, event=dec.status == "event")
    return PatientRecord(patient_id=f"{patient.patient_id}~twin{copy}", site=patient.site,
                         index_date=patient.index_date, baseline=dict(patient.baseline), arm=arm,
                         events=history + tuple(Event(time=e.time, code=e.code, value=e.value, unit=e.unit)
                                                for e in dec.events),
                         outcomes=outcomes)


def generate_twins(model: TwinGPT, tok: EventTokenizer, patients: list[PatientRecord], *, arm: Arm, n: int,
                   sampling: SamplingConfig, max_tries: int = 3, meta: dict[str, str] | None = None,
                   allow_censoring: bool = False, on_progress: Callable[[int], None] | None = None,
                   constraints: Constraints | None = None) -> tuple[list[Twin], list[FailedTwin], dict]:
    """n gated twins per patient under `arm`, starting from `constraints` (e.g. a reviewer's); returns
    (twins, failures, stats)."""
    if n < 1 or max_tries < 1:
        raise ValueError("n and max_tries must be >= 1")
    jobs = [(row, copy) for row in range(len(patients)) for copy in range(n)]
    encoded = [tok.encode(p, arm=arm, meta=meta, with_future=False) for p in patients]
    prompts = [encoded[row].ids for row, _ in jobs]
    start = Constraints(allow_censoring=allow_censoring).merge(constraints or Constraints())
    cons = {j: start for j in range(len(jobs))}
    last_reasons: dict[int, tuple[str, ...]] = {}
    done: dict[int, Twin] = {}
    pending = list(range(len(jobs)))
    for attempt in range(1, max_tries + 1):
        if not pending:
            break
        cfg = SamplingConfig(**{**sampling.__dict__, "seed": sampling.seed + 7919 * (attempt - 1)})
        futures = sample(model, tok, [prompts[j] for j in pending], cfg, constraints=[cons[j] for j in pending],
                         on_batch=on_progress if attempt == 1 else None)
        still = []
        for j, fut in zip(pending, futures):
            row, copy = jobs[j]
            room = min(cfg.max_new, model.cfg.n_positions - len(prompts[j]))
            report = check_twin(tok, patients[row], fut, max_new=room)
            if report.passed:
                done[j] = Twin(row, copy, arm, twin_record(patients[row], tok, fut, arm, copy), report.score, attempt)
            else:
                cons[j] = cons[j].merge(report.constraints)
                last_reasons[j] = report.reasons
                still.append(j)
        pending = still
    twins = [done[j] for j in sorted(done)]
    failed = [FailedTwin(jobs[j][0], jobs[j][1], arm, max_tries, last_reasons[j]) for j in pending]
    stats = {"requested": len(jobs), "passed": len(twins), "failed": len(failed),
             "first_try_pass_rate": round(sum(t.tries == 1 for t in twins) / max(len(jobs), 1), 4),
             "truncated_histories": sum(e.truncated_visits > 0 for e in encoded),
             "unknown_tokens": dict(sum((e.unknown for e in encoded), start=Counter()))}
    return twins, failed, stats
