"""Turn canonical records into model tensors: static covariates and the visit sequence."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from .record import Arm, PatientRecord

# lab code -> (name, center, scale, log-transform)
DEFAULT_LABS: tuple[tuple[str, str, float, float, bool], ...] = (
    ("13457-7", "ldl", 130.0, 30.0, False),
    ("4548-4", "hba1c", 6.0, 1.0, False),
    ("33914-3", "egfr", 80.0, 20.0, False),
    ("1988-5", "crp", 0.6, 0.8, True),
    ("8480-6", "sbp", 130.0, 15.0, False),
)
# covariate -> (center, scale) for numbers; binary flags are 0/1
DEFAULT_NUMERIC: tuple[tuple[str, float, float], ...] = (("age", 65.0, 10.0), ("bmi", 28.0, 5.0))
DEFAULT_BINARY: tuple[str, ...] = ("diabetes", "hypertension", "ckd", "prior_mi")
DEFAULT_CATEGORICAL: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sex", ("F", "M")),
    ("genotype", ("CC", "TC", "TT")),
)
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class FeatureSpec:
    """Fixed, data-independent scaling, so every site encodes patients identically."""

    labs: tuple[tuple[str, str, float, float, bool], ...] = DEFAULT_LABS
    numeric: tuple[tuple[str, float, float], ...] = DEFAULT_NUMERIC
    binary: tuple[str, ...] = DEFAULT_BINARY
    categorical: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_CATEGORICAL
    max_visits: int = 16
    history_days: float = 730.0
    version: str = "1"

    @property
    def static_dim(self) -> int:
        """Width of the static vector: covariates, arm, baseline labs and their missingness."""
        return (len(self.numeric) + len(self.binary) + sum(len(c) for _, c in self.categorical)
                + 1 + 2 * len(self.labs))

    @property
    def visit_dim(self) -> int:
        """Width of one visit: time, gap, then value and presence per lab."""
        return 2 + 2 * len(self.labs)

    def fingerprint(self) -> str:
        """sha256 of the spec: stored in snapshots and manifests to catch mismatches."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def _lab_z(spec_lab: tuple[str, str, float, float, bool], value: float) -> float:
    _, _, center, scale, log = spec_lab
    v = math.log(max(value, 1e-3)) if log else value
    return float(np.clip((v - center) / scale, -6, 6))


def encode(record: PatientRecord, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray, int]:
    """One record -> (static [S], visits [max_visits, V], number of visits >= 1)."""
    b = record.baseline
    static: list[float] = []
    for name, center, scale in spec.numeric:
        v = b.get(name)
        static.append(0.0 if v is None else float(np.clip((float(v) - center) / scale, -6, 6)))
    static += [float(b.get(name) or 0) for name in spec.binary]
    for name, levels in spec.categorical:
        static += [1.0 if str(b.get(name)) == lvl else 0.0 for lvl in levels]
    static.append(1.0 if record.arm == Arm.TREATMENT else 0.0)
    codes = {lab[0]: i for i, lab in enumerate(spec.labs)}
    # visits: events before index grouped by day, most recent max_visits kept
    by_time: dict[float, dict[int, float]] = {}
    for e in record.history(until=0.0):
        if e.code in codes and e.value is not None and e.time >= -spec.history_days:
            by_time.setdefault(e.time, {})[codes[e.code]] = e.value
    times = sorted(by_time)[-spec.max_visits:]
    last = [None] * len(spec.labs)
    visits = np.zeros((spec.max_visits, spec.visit_dim), dtype=np.float32)
    prev = times[0] if times else 0.0
    for row, t in enumerate(times):
        visits[row, 0] = t / 365.0
        visits[row, 1] = (t - prev) / 365.0
        prev = t
        for j, v in by_time[t].items():
            visits[row, 2 + 2 * j] = _lab_z(spec.labs[j], v)
            visits[row, 3 + 2 * j] = 1.0
            last[j] = v
    for j, lab in enumerate(spec.labs):
        static += [0.0, 0.0] if last[j] is None else [_lab_z(lab, last[j]), 1.0]
    return np.asarray(static, dtype=np.float32), visits, max(len(times), 1)


def split_of(patient_id: str, *, val: float = 0.15, test: float = 0.2) -> int:
    """Deterministic train/val/test assignment from the pseudonym."""
    u = int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big") / 2**64
    return SPLITS["test"] if u < test else SPLITS["val"] if u < test + val else SPLITS["train"]


def encode_cohort(records: list[PatientRecord], spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Stack records into the arrays of a training snapshot."""
    n = len(records)
    static = np.zeros((n, spec.static_dim), dtype=np.float32)
    visits = np.zeros((n, spec.max_visits, spec.visit_dim), dtype=np.float32)
    lengths = np.zeros(n, dtype=np.int64)
    time = np.full(n, np.nan, dtype=np.float32)
    event = np.zeros(n, dtype=np.float32)
    binary = np.full(n, np.nan, dtype=np.float32)
    continuous = np.full(n, np.nan, dtype=np.float32)
    split = np.zeros(n, dtype=np.int64)
    for i, r in enumerate(records):
        static[i], visits[i], lengths[i] = encode(r, spec)
        o = r.outcomes
        if o.time_to_event is not None:
            time[i], event[i] = o.time_to_event, float(bool(o.event))
        if o.binary is not None:
            binary[i] = o.binary
        if o.continuous is not None:
            continuous[i] = o.continuous
        split[i] = split_of(r.patient_id)
    return {"static": static, "visits": visits, "lengths": lengths, "time": time, "event": event,
            "binary": binary, "continuous": continuous, "split": split}
