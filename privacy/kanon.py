"""k-anonymity and l-diversity over quasi-identifiers, with generalization and suppression.

Generalization climbs one hierarchy level at a time on the attribute whose climb removes
the most records from classes smaller than k (a greedy full-domain search, as in
Samarati's and ARX's basic modes); the records still in small classes are then suppressed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Row = dict[str, object]


def _age_band(width: int) -> Callable[[object], object]:
    def band(v: object) -> object:
        if v is None:
            return None
        lo = int(float(v)) // width * width
        return f"{lo}-{lo + width - 1}"
    return band


def _prefix(n: int) -> Callable[[object], object]:
    return lambda v: None if v is None else (str(v)[:n] + "*" * max(0, len(str(v)) - n))


def _star(_: object) -> object:
    return "*"


def _identity(v: object) -> object:
    return v


# attribute -> levels, from exact to fully suppressed
HIERARCHIES: dict[str, list[tuple[str, Callable[[object], object]]]] = {
    "age": [("exact", _identity), ("5-year bands", _age_band(5)), ("10-year bands", _age_band(10)),
            ("20-year bands", _age_band(20)), ("suppressed", _star)],
    "zip3": [("3 digits", _identity), ("2 digits", _prefix(2)), ("1 digit", _prefix(1)), ("suppressed", _star)],
    "sex": [("exact", _identity), ("suppressed", _star)],
}
DEFAULT_LEVELS = [("exact", _identity), ("suppressed", _star)]


@dataclass
class KAnonReport:
    """What an anonymity check found and what it took to reach k."""

    k: int
    quasi_identifiers: list[str]
    records: int
    equivalence_classes: int
    min_class_size: int
    records_below_k: int
    sensitive: str | None = None
    min_l: int | None = None
    classes_below_l: int | None = None
    generalization: dict[str, str] = field(default_factory=dict)
    suppressed: int = 0

    def to_dict(self) -> dict:
        """JSON-ready view."""
        return dict(self.__dict__)


def measure(rows: Sequence[Row], quasi: Sequence[str], *, k: int, sensitive: str | None = None,
            l_target: int = 2) -> KAnonReport:
    """k-anonymity (and distinct l-diversity when `sensitive` is given) of the rows as they are."""
    if k < 1:
        raise ValueError("k must be at least 1")
    classes: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        classes[tuple(r.get(q) for q in quasi)].append(r)
    sizes = [len(v) for v in classes.values()]
    report = KAnonReport(k=k, quasi_identifiers=list(quasi), records=len(rows), equivalence_classes=len(classes),
                         min_class_size=min(sizes) if sizes else 0,
                         records_below_k=sum(s for s in sizes if s < k))
    if sensitive is not None:
        ls = [len({r.get(sensitive) for r in members}) for members in classes.values()]
        report.sensitive, report.min_l = sensitive, min(ls) if ls else 0
        report.classes_below_l = sum(1 for x in ls if x < l_target)
    return report


def _apply(rows: Sequence[Row], quasi: Sequence[str], levels: dict[str, int]) -> list[Row]:
    out = []
    for r in rows:
        g = dict(r)
        for q in quasi:
            g[q] = HIERARCHIES.get(q, DEFAULT_LEVELS)[levels[q]][1](r.get(q))
        out.append(g)
    return out


def anonymize(rows: Sequence[Row], quasi: Sequence[str], *, k: int = 5, sensitive: str | None = None,
              max_suppression: float = 0.05) -> tuple[list[Row], KAnonReport]:
    """Generalize then suppress until every remaining class has at least k records.

    Generalization stops once the records in small classes are at most `max_suppression`
    of the total; those are suppressed (dropped). Returns the released rows and the report.
    """
    if not 0 <= max_suppression < 1:
        raise ValueError("max_suppression must be in [0, 1)")
    levels = {q: 0 for q in quasi}
    current = _apply(rows, quasi, levels)
    while measure(current, quasi, k=k).records_below_k > max_suppression * len(rows):
        best = None
        for q in quasi:
            if levels[q] + 1 >= len(HIERARCHIES.get(q, DEFAULT_LEVELS)):
                continue
            trial = {**levels, q: levels[q] + 1}
            below = measure(_apply(rows, quasi, trial), quasi, k=k).records_below_k
            if best is None or below < best[0]:
                best = (below, q)
        if best is None:
            break  # every attribute fully suppressed
        levels[best[1]] += 1
        current = _apply(rows, quasi, levels)
    counts = Counter(tuple(r.get(q) for q in quasi) for r in current)
    released = [r for r in current if counts[tuple(r.get(q) for q in quasi)] >= k]
    report = measure(released, quasi, k=k, sensitive=sensitive)
    report.records = len(rows)
    report.suppressed = len(rows) - len(released)
    report.generalization = {q: HIERARCHIES.get(q, DEFAULT_LEVELS)[levels[q]][0] for q in quasi}
    return released, report
