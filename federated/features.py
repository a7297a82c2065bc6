"""Turn canonical records into model tensors: static covariates and the visit sequence."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .record import Arm, PatientRecord
from .summaries import DataSummary, NumericSummary, summarize

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
    # (name, centre, scale) or (name, centre, scale, log1p): skewed covariates scale on log1p
    numeric: tuple[tuple, ...] = DEFAULT_NUMERIC
    binary: tuple[str, ...] = DEFAULT_BINARY
    categorical: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_CATEGORICAL
    max_visits: int = 16
    history_days: float = 730.0
    version: str = "1"
    # each lab's trend over the history window as a static column (see `lab_trend`); a spec written before
    # trends existed has none, so models trained on it keep their input width
    lab_trends: bool = True

    @property
    def static_dim(self) -> int:
        """Width of the static vector: covariates, arm, baseline labs, their missingness and trends."""
        return (len(self.numeric) + len(self.binary) + sum(len(c) for _, c in self.categorical)
                + 1 + (3 if self.lab_trends else 2) * len(self.labs))

    @property
    def visit_dim(self) -> int:
        """Width of one visit: time, gap, then value and presence per lab."""
        return 2 + 2 * len(self.labs)

    def _doc(self) -> dict:
        doc = asdict(self)
        if not self.lab_trends:  # a spec without trends reads, and fingerprints, as it did before they existed
            del doc["lab_trends"]
        return doc

    def fingerprint(self) -> str:
        """sha256 of the spec: stored in snapshots and manifests to catch mismatches."""
        return hashlib.sha256(json.dumps(self._doc(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict:
        """The spec as a JSON-able dict (lists for tuples); `from_dict` inverts it exactly."""
        return json.loads(json.dumps(self._doc()))

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        """Rebuild a spec from `to_dict` output (or its JSON), restoring tuples and number types."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"feature spec has unknown keys {sorted(unknown)}; "
                             "was it written by a newer evoclone?")
        kw: dict = {}
        # types are restored exactly so the fingerprint of a round-tripped spec is unchanged
        if "labs" in d:
            kw["labs"] = tuple((str(c), str(n), float(m), float(s), bool(lg)) for c, n, m, s, lg in d["labs"])
        if "numeric" in d:
            kw["numeric"] = tuple((str(e[0]), float(e[1]), float(e[2]), *[bool(x) for x in e[3:4]])
                                  for e in d["numeric"])
        if "binary" in d:
            kw["binary"] = tuple(str(n) for n in d["binary"])
        if "categorical" in d:
            kw["categorical"] = tuple((str(n), tuple(str(v) for v in lv)) for n, lv in d["categorical"])
        if "max_visits" in d:
            kw["max_visits"] = int(d["max_visits"])
        if "history_days" in d:
            kw["history_days"] = float(d["history_days"])
        if "version" in d:
            kw["version"] = str(d["version"])
        kw["lab_trends"] = bool(d.get("lab_trends", False))  # absent: written before trends existed
        return cls(**kw)

    def feature_names(self) -> tuple[list[str], list[str]]:
        """Names of the static columns and of the visit columns, in encoding order (for explanations).

        One-hot levels share their covariate's name; a lab's value, presence and trend columns share its name.
        """
        static = [n for n, *_ in self.numeric] + list(self.binary)
        static += [n for n, levels in self.categorical for _ in levels]
        static.append("arm")
        static += [lab[1] for lab in self.labs for _ in range(2)]
        if self.lab_trends:
            static += [lab[1] for lab in self.labs]
        visit = ["time", "gap"] + [lab[1] for lab in self.labs for _ in range(2)]
        return static, visit

    @classmethod
    def fit(cls, records: list[PatientRecord], *, covariates: list[str] | None = None, min_count: int = 10,
            max_visits: int = 16, history_days: float = 730.0) -> "FeatureSpec":
        """A spec derived from the data: scaling for any covariates and the lab codes the records carry."""
        return fit_spec(cls, records, covariates=covariates, min_count=min_count, max_visits=max_visits,
                        history_days=history_days)


def _lab_z(spec_lab: tuple[str, str, float, float, bool], value: float) -> float:
    _, _, center, scale, log = spec_lab
    v = math.log(max(value, 1e-3)) if log else value
    return float(np.clip((v - center) / scale, -6, 6))


TREND_MIN_SPAN_DAYS = 90.0


def lab_trend(times: list[float], values: list[float], history_days: float) -> float:
    """A lab's least-squares slope over the history window, as the change across the whole window in the
    lab's scaled units (z per window), clipped to +-6; 0 (no trend) with fewer than two values or when they
    span under TREND_MIN_SPAN_DAYS. Trajectories carry prognosis that the last value misses (eGFR decline,
    rising CRP), and one number per lab is cheap for a model trained under DP noise."""
    if len(times) < 2 or max(times) - min(times) < TREND_MIN_SPAN_DAYS:
        return 0.0
    t = np.asarray(times, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    dt = t - t.mean()
    slope_per_day = float((dt * (v - v.mean())).sum() / (dt * dt).sum())
    return float(np.clip(slope_per_day * history_days, -6, 6))


def _number(v: float | str | None) -> float | None:
    """A baseline value as a float; None when missing (None, empty or NaN)."""
    if v is None or v == "":
        return None
    f = float(v)
    return None if math.isnan(f) else f


def encode(record: PatientRecord, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray, int]:
    """One record -> (static [S], visits [max_visits, V], number of visits >= 1)."""
    b = record.baseline
    static: list[float] = []
    # missing numbers (None or NaN, as flat tables deliver them) encode as 0: centred, like an
    # absent lab; a NaN must never reach the model, where it would poison a whole batch
    for name, center, scale, *log in spec.numeric:
        v = _number(b.get(name))
        if v is not None and log and log[0]:
            v = math.log1p(max(v, 0.0))
        static.append(0.0 if v is None else float(np.clip((v - center) / scale, -6, 6)))
    for name in spec.binary:
        v = _number(b.get(name))
        static.append(0.0 if v is None else v)
    for name, levels in spec.categorical:
        v = b.get(name)
        v = None if isinstance(v, float) and math.isnan(v) else v
        static += [1.0 if v is not None and str(v) == lvl else 0.0 for lvl in levels]
    static.append(1.0 if record.arm == Arm.TREATMENT else 0.0)
    codes = {lab[0]: i for i, lab in enumerate(spec.labs)}
    # visits: events before index grouped by day, most recent max_visits kept
    by_time: dict[float, dict[int, float]] = {}
    for e in record.history(until=0.0):
        if e.code in codes and e.value is not None and e.time >= -spec.history_days:
            by_time.setdefault(e.time, {})[codes[e.code]] = e.value
    ordered = sorted(by_time)
    times = ordered[-spec.max_visits:]
    skipped = len(ordered) - len(times)  # older visit days: they count towards the trends only
    last: list[float | None] = [None] * len(spec.labs)  # z of each lab's last value among the kept visits
    series: list[tuple[list[float], list[float]]] = [([], []) for _ in spec.labs]  # (days, z) per lab
    visits = np.zeros((spec.max_visits, spec.visit_dim), dtype=np.float32)
    prev = times[0] if times else 0.0
    for i, t in enumerate(ordered):
        row = i - skipped
        if row >= 0:
            visits[row, 0] = t / 365.0
            visits[row, 1] = (t - prev) / 365.0
            prev = t
        for j, v in by_time[t].items():
            z = _lab_z(spec.labs[j], v)
            series[j][0].append(t)
            series[j][1].append(z)
            if row >= 0:
                visits[row, 2 + 2 * j] = z
                visits[row, 3 + 2 * j] = 1.0
                last[j] = z
    for z in last:
        static += [0.0, 0.0] if z is None else [z, 1.0]
    if spec.lab_trends:  # from every value in the window, not only the max_visits kept as visits
        static += [lab_trend(ts, vs, spec.history_days) for ts, vs in series]
    return np.asarray(static, dtype=np.float32), visits, max(len(times), 1)


def split_of(patient_id: str, *, val: float = 0.15, test: float = 0.2) -> int:
    """Deterministic train/val/test assignment from the pseudonym."""
    u = int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big") / 2**64
    return SPLITS["test"] if u < test else SPLITS["val"] if u < test + val else SPLITS["train"]


def split_records(records: list[PatientRecord]) -> dict[str, list[int]]:
    """Indices of the records in each split ("train", "val", "test"), by `split_of`."""
    out: dict[str, list[int]] = {name: [] for name in SPLITS}
    names = {v: k for k, v in SPLITS.items()}
    for i, r in enumerate(records):
        out[names[split_of(r.patient_id)]].append(i)
    return out


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


# -- a spec fitted to the data (flat tables with arbitrary covariates and codes) -------------


def _sig2(x: float) -> float:
    """Round to two significant digits."""
    return 0.0 if x == 0 or not math.isfinite(x) else float(f"{x:.2g}")


def _center_scale(values: NumericSummary, transform=None) -> tuple[float, float]:
    """Median and a robust spread (IQR/1.349, then sd, then 1), both to two significant digits.

    `transform` (log or log1p, monotone) maps the quantiles; the sd fallback is then 1.
    """
    q25, q50, q75 = values.quantile([0.25, 0.5, 0.75])
    if transform is not None:
        q25, q50, q75 = transform(q25), transform(q50), transform(q75)
    scale = float(q75 - q25) / 1.349
    if not scale > 0 and transform is None:
        scale = values.std(ddof=1)
    scale = _sig2(scale) if scale > 0 else 1.0
    return _sig2(float(q50)), scale


def _skewed(values: NumericSummary, *, low: float | None) -> bool:
    """Strong right skew: the quantile skew ratio (p90 - p50) / (p50 - p10) above 2.

    The ratio is location- and scale-free and ignores outliers (for a log-normal it is
    exp(1.28 sigma): > 2 means sigma > 0.54; symmetric variables give about 1). Values must be
    positive (`low=None`, for log) or non-negative (`low=0`, for log1p).
    """
    if low is None and not values.positive or low is not None and not values.nonneg:
        return False
    p10, p50, p90 = values.quantile([0.1, 0.5, 0.9])
    return bool(p50 > p10 and (p90 - p50) / (p50 - p10) > 2)


def fit_spec(cls: type[FeatureSpec], records: list[PatientRecord], *, covariates: list[str] | None,
             min_count: int, max_visits: int, history_days: float) -> FeatureSpec:
    """Derive a FeatureSpec from records (see `FeatureSpec.fit`), through their summary."""
    if not records:
        raise ValueError("cannot fit a feature spec to zero records; pass the training records")
    return spec_from_summary(cls, summarize(records, covariates=covariates, history_days=history_days,
                                            min_count=min_count), max_visits=max_visits)


def spec_from_summary(cls: type[FeatureSpec], summary: DataSummary, *, max_visits: int = 16) -> FeatureSpec:
    """A FeatureSpec from a data summary: one site's, or the merge of every site's.

    The spec is written into every model directory, so it must not describe individuals:
    centres and scales are rounded to two significant digits, a category level or a lab code
    enters only when at least `min_count` records carry it (rarer levels get no indicator and
    encode like a missing value), and numeric covariates seen in fewer records are left out.
    This coarsening limits what the spec reveals; it is NOT covered by the DP epsilon, which
    accounts for the model weights only.
    """
    if max_visits < 1 or not summary.history_days > 0:
        raise ValueError(f"max_visits must be >= 1 and history_days > 0, got {max_visits} and {summary.history_days}")
    numeric: list[tuple] = []
    binary: list[str] = []
    categorical: list[tuple[str, tuple[str, ...]]] = []
    for col in summary.columns:
        if not col.observed:
            continue
        if col.numeric:
            if col.binary:
                binary.append(col.name)
            elif col.values is not None:
                if _skewed(col.values, low=0.0):  # counts and assay levels (nodes, receptors): log1p axis
                    numeric.append((col.name, *_center_scale(col.values, math.log1p), True))
                else:
                    numeric.append((col.name, *_center_scale(col.values)))
            continue
        levels = tuple(sorted(lvl for lvl, c in col.levels.items() if c >= summary.min_count))
        if levels:
            categorical.append((col.name, levels))
    # labs: the values the encoder will see (history within the window, up to the index)
    labs: list[tuple[str, str, float, float, bool]] = []
    for code in summary.codes:
        if code.window_carriers < summary.min_count or code.window_values is None:
            continue
        # strongly right-skewed positive values (CRP, triglycerides, viral loads) scale on the log axis
        log = _skewed(code.window_values, low=None)
        transform = (lambda v: math.log(max(v, 1e-3))) if log else None
        labs.append((code.code, code.code, *_center_scale(code.window_values, transform), log))
    return cls(labs=tuple(labs), numeric=tuple(numeric), binary=tuple(binary), categorical=tuple(categorical),
               max_visits=int(max_visits), history_days=float(summary.history_days))
