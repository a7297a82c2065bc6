"""Mergeable data summaries: what a feature spec or a twin vocabulary is fitted from.

Centralized training summarizes its records in one go; a federated study asks every site
for its summary (aggregate statistics only, rare cells suppressed at the site) and merges
them at the coordinator. Both then fit the spec and the vocabulary from the same kind of
summary, so there is one fitting code path.

A numeric summary keeps the count, mean and sum of squares (merged exactly) and the
quantiles on `GRID` (merged by count-weighted quantile averaging, exact for identically
distributed sites and close otherwise). `GRID` holds every probability the fits use
(quartiles, deciles, eighths, fifths, 0.5% / 99.5%), so a single-site summary reproduces
`np.quantile` on the raw values exactly. No minimum or maximum is ever summarized.

What a site sends is coarsened: quantiles to three significant digits, levels, codes and
numeric columns seen in fewer than `min_count` patients left out. This limits what the
summary reveals; it is not covered by the DP epsilon, which accounts for model weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .record import PatientRecord

GRID: tuple[float, ...] = tuple(sorted({k / 40 for k in range(1, 40)} | {0.005, 0.995}))
FORMAT = "evoclone-summary/1"


def level(v) -> str:
    """A category value as text: whole floats without their '.0' (a CSV's 1.0 is level '1')."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _missing(v) -> bool:
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v))


def _sig(x: float, digits: int) -> float:
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(round(x, -int(math.floor(math.log10(abs(x)))) + digits - 1))


@dataclass
class NumericSummary:
    """Count, moments and grid quantiles of one variable."""

    n: int
    mean: float
    m2: float  # sum of squared deviations from the mean
    q: tuple[float, ...]  # quantiles at GRID
    positive: bool  # every value > 0
    nonneg: bool  # every value >= 0

    @classmethod
    def of(cls, values) -> "NumericSummary":
        """Summary of raw values (at least one)."""
        arr = np.asarray(values, dtype=np.float64)
        mean = float(arr.mean())
        return cls(n=int(arr.size), mean=mean, m2=float(((arr - mean) ** 2).sum()),
                   q=tuple(float(x) for x in np.quantile(arr, GRID)), positive=bool((arr > 0).all()),
                   nonneg=bool((arr >= 0).all()))

    def quantile(self, p):
        """Quantile(s) at probability p (interpolated between grid points)."""
        out = np.interp(p, GRID, self.q)
        return float(out) if np.ndim(out) == 0 else out

    def std(self, ddof: int = 0) -> float:
        """Standard deviation (0 when undefined)."""
        return math.sqrt(self.m2 / (self.n - ddof)) if self.n - ddof > 0 else 0.0

    def coarse(self) -> "NumericSummary":
        """The same summary with three significant digits (what leaves a site)."""
        return NumericSummary(n=self.n, mean=_sig(self.mean, 3), m2=_sig(self.m2, 3),
                              q=tuple(_sig(x, 3) for x in self.q), positive=self.positive, nonneg=self.nonneg)

    @staticmethod
    def merge(parts: list["NumericSummary"]) -> "NumericSummary | None":
        """Exact count and moments (Chan et al.), count-weighted averaged quantiles."""
        parts = [p for p in parts if p is not None and p.n > 0]
        if not parts:
            return None
        n = sum(p.n for p in parts)
        mean = sum(p.n * p.mean for p in parts) / n
        m2 = sum(p.m2 + p.n * (p.mean - mean) ** 2 for p in parts)
        q = tuple(float(x) for x in sum(np.asarray(p.q) * p.n for p in parts) / n)
        return NumericSummary(n=n, mean=mean, m2=m2, q=q, positive=all(p.positive for p in parts),
                              nonneg=all(p.nonneg for p in parts))

    def to_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "m2": self.m2, "q": list(self.q), "positive": self.positive,
                "nonneg": self.nonneg}

    @classmethod
    def from_dict(cls, d: dict | None) -> "NumericSummary | None":
        if d is None:
            return None
        if len(d["q"]) != len(GRID):
            raise ValueError(f"numeric summary has {len(d['q'])} quantiles, expected {len(GRID)}; "
                             "sites and coordinator run different evoclone versions")
        return cls(n=int(d["n"]), mean=float(d["mean"]), m2=float(d["m2"]), q=tuple(float(x) for x in d["q"]),
                   positive=bool(d["positive"]), nonneg=bool(d["nonneg"]))


@dataclass
class ColumnSummary:
    """One baseline covariate: its kind, its levels (categories and 0/1 flags) or its values."""

    name: str
    numeric: bool = True  # every observed value is a number
    binary: bool = True  # every observed value is 0 or 1
    levels: dict[str, int] = field(default_factory=dict)  # level -> patients (non-numeric or 0/1 columns)
    values: NumericSummary | None = None  # numeric columns seen in at least min_count patients
    observed: int = 0


@dataclass
class CodeSummary:
    """One event code: carriers, units and values, over all events and in the history window."""

    code: str
    carriers: int = 0  # patients with the code at any time
    units: dict[str, int] = field(default_factory=dict)
    values: NumericSummary | None = None  # every value of the code
    window_carriers: int = 0  # patients with a valued event in the history window before the index
    window_values: NumericSummary | None = None


@dataclass
class DataSummary:
    """Everything the feature spec and the twin vocabulary are fitted from."""

    records: int
    columns: list[ColumnSummary]
    codes: list[CodeSummary]
    followup: NumericSummary | None  # observed time-to-event times
    last_event: float  # latest event time over the records (fallback horizon when no follow-up)
    history_days: float
    min_count: int

    def column(self, name: str) -> ColumnSummary | None:
        return next((c for c in self.columns if c.name == name), None)

    def to_dict(self) -> dict:
        def col(c: ColumnSummary) -> dict:
            return {"name": c.name, "numeric": c.numeric, "binary": c.binary, "levels": c.levels,
                    "values": c.values.to_dict() if c.values else None, "observed": c.observed}

        def code(c: CodeSummary) -> dict:
            return {"code": c.code, "carriers": c.carriers, "units": c.units,
                    "values": c.values.to_dict() if c.values else None, "window_carriers": c.window_carriers,
                    "window_values": c.window_values.to_dict() if c.window_values else None}

        return {"format": FORMAT, "records": self.records, "columns": [col(c) for c in self.columns],
                "codes": [code(c) for c in self.codes],
                "followup": self.followup.to_dict() if self.followup else None, "last_event": self.last_event,
                "history_days": self.history_days, "min_count": self.min_count}

    @classmethod
    def from_dict(cls, d: dict) -> "DataSummary":
        if d.get("format") != FORMAT:
            raise ValueError(f"not an evoclone data summary (format {d.get('format')!r}, expected {FORMAT})")
        cols = [ColumnSummary(name=str(c["name"]), numeric=bool(c["numeric"]), binary=bool(c["binary"]),
                              levels={str(k): int(v) for k, v in c["levels"].items()},
                              values=NumericSummary.from_dict(c["values"]), observed=int(c["observed"]))
                for c in d["columns"]]
        codes = [CodeSummary(code=str(c["code"]), carriers=int(c["carriers"]),
                             units={str(k): int(v) for k, v in c["units"].items()},
                             values=NumericSummary.from_dict(c["values"]), window_carriers=int(c["window_carriers"]),
                             window_values=NumericSummary.from_dict(c["window_values"])) for c in d["codes"]]
        return cls(records=int(d["records"]), columns=cols, codes=codes,
                   followup=NumericSummary.from_dict(d["followup"]), last_event=float(d["last_event"]),
                   history_days=float(d["history_days"]), min_count=int(d["min_count"]))


def summarize(records: list[PatientRecord], *, covariates: list[str] | None = None, history_days: float = 730.0,
              min_count: int = 10, coarse: bool = False) -> DataSummary:
    """Summarize records; cells seen in fewer than `min_count` patients are left out.

    `coarse=True` is what a site sends off-site: quantiles and moments to three significant
    digits and the latest event time to two.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if not records:
        raise ValueError("cannot summarize zero records")
    names = covariates if covariates is not None else list(dict.fromkeys(k for r in records for k in r.baseline))
    cols = []
    for name in dict.fromkeys(names):
        values = [v for r in records if not _missing(v := r.baseline.get(name))]
        c = ColumnSummary(name=name, observed=len(values))
        c.numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        c.binary = c.numeric and all(v in (0, 1) for v in values)
        if not c.numeric or c.binary:
            counts: dict[str, int] = {}
            for v in values:
                counts[level(v)] = counts.get(level(v), 0) + 1
            c.levels = {k: n for k, n in sorted(counts.items()) if n >= min_count}
        if c.numeric and values and len(values) >= min_count:
            c.values = NumericSummary.of(values)
        cols.append(c)
    per_code: dict[str, list[float]] = {}
    window: dict[str, list[float]] = {}
    carriers: dict[str, int] = {}
    window_carriers: dict[str, int] = {}
    units: dict[str, dict[str, int]] = {}
    last = 0.0
    for r in records:
        seen: set[str] = set()
        seen_window: set[str] = set()
        for e in r.events:
            seen.add(e.code)
            last = max(last, e.time)
            u = units.setdefault(e.code, {})
            u[e.unit or ""] = u.get(e.unit or "", 0) + 1
            if e.value is not None:
                per_code.setdefault(e.code, []).append(e.value)
                if -history_days <= e.time <= 0:
                    window.setdefault(e.code, []).append(e.value)
                    seen_window.add(e.code)
        for code in seen:
            carriers[code] = carriers.get(code, 0) + 1
        for code in seen_window:
            window_carriers[code] = window_carriers.get(code, 0) + 1
    codes = []
    for code in sorted(carriers):
        if carriers[code] < min_count:
            continue
        vals, win = per_code.get(code, []), window.get(code, [])
        wc = window_carriers.get(code, 0)
        codes.append(CodeSummary(
            code=code, carriers=carriers[code], units={k: n for k, n in units[code].items() if n >= min_count}
            or {max(units[code], key=units[code].get): min_count},
            values=NumericSummary.of(vals) if len(vals) >= min_count else None,
            window_carriers=wc if wc >= min_count else 0,
            window_values=NumericSummary.of(win) if wc >= min_count and win else None))
    times = [r.outcomes.time_to_event for r in records if r.outcomes.time_to_event is not None]
    s = DataSummary(records=len(records), columns=cols, codes=codes,
                    followup=NumericSummary.of(times) if len(times) >= min_count or (times and not coarse) else None,
                    last_event=last, history_days=float(history_days), min_count=int(min_count))
    return coarsen(s) if coarse else s


def coarsen(s: DataSummary) -> DataSummary:
    """Three significant digits on every number a summary carries (two on the latest event time)."""
    for c in s.columns:
        c.values = c.values.coarse() if c.values else None
    for c in s.codes:
        c.values = c.values.coarse() if c.values else None
        c.window_values = c.window_values.coarse() if c.window_values else None
    s.followup = s.followup.coarse() if s.followup else None
    s.last_event = _sig(s.last_event, 2)
    return s


def merge(parts: list[DataSummary]) -> DataSummary:
    """One summary from the sites' summaries (columns in first-seen order, codes sorted)."""
    if not parts:
        raise ValueError("no site summaries to merge")
    if len({(p.history_days, p.min_count) for p in parts}) > 1:
        raise ValueError("site summaries were computed with different history windows or minimum counts")
    cols: dict[str, list[ColumnSummary]] = {}
    for p in parts:
        for c in p.columns:
            cols.setdefault(c.name, []).append(c)
    merged_cols = []
    for name, cs in cols.items():
        seen = [c for c in cs if c.observed]
        levels: dict[str, int] = {}
        for c in cs:
            for k, n in c.levels.items():
                levels[k] = levels.get(k, 0) + n
        merged_cols.append(ColumnSummary(
            name=name, numeric=all(c.numeric for c in seen), binary=all(c.binary for c in seen),
            levels=dict(sorted(levels.items())), values=NumericSummary.merge([c.values for c in cs]),
            observed=sum(c.observed for c in cs)))
    codes: dict[str, list[CodeSummary]] = {}
    for p in parts:
        for c in p.codes:
            codes.setdefault(c.code, []).append(c)
    merged_codes = []
    for code in sorted(codes):
        cs = codes[code]
        units: dict[str, int] = {}
        for c in cs:
            for k, n in c.units.items():
                units[k] = units.get(k, 0) + n
        merged_codes.append(CodeSummary(
            code=code, carriers=sum(c.carriers for c in cs), units=units,
            values=NumericSummary.merge([c.values for c in cs]),
            window_carriers=sum(c.window_carriers for c in cs),
            window_values=NumericSummary.merge([c.window_values for c in cs])))
    return DataSummary(records=sum(p.records for p in parts), columns=merged_cols, codes=merged_codes,
                       followup=NumericSummary.merge([p.followup for p in parts]),
                       last_event=max(p.last_event for p in parts), history_days=parts[0].history_days,
                       min_count=parts[0].min_count)


def horizon(s: DataSummary, quantile: float) -> float:
    """Follow-up most patients reach: a quantile of observed times, rounded to 30 days (>= 30)."""
    base = s.followup.quantile(quantile) if s.followup is not None else s.last_event
    return float(max(30.0, round(base / 30.0) * 30.0))
