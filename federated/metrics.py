"""Evaluation metrics (lifelines implementations, so results match the reference)."""

from __future__ import annotations

import numpy as np
from lifelines import KaplanMeierFitter
from lifelines.utils import concordance_index


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index; `risk` higher means earlier events. NaN when no pair is comparable."""
    time, event, risk = (np.asarray(a, dtype=float) for a in (time, event, risk))
    if len(time) < 2 or event.sum() == 0:
        return float("nan")
    try:
        return float(concordance_index(time, -risk, event))
    except ZeroDivisionError:  # lifelines raises when no pair is admissible
        return float("nan")


def kaplan_meier(time: np.ndarray, event: np.ndarray, *, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """Observed survival curve (times, survival probabilities) up to `horizon`."""
    km = KaplanMeierFitter().fit(np.asarray(time, dtype=float), np.asarray(event, dtype=float))
    sf = km.survival_function_
    t = sf.index.to_numpy()
    keep = t <= horizon
    return t[keep], sf.iloc[:, 0].to_numpy()[keep]


def risk_groups(risk: np.ndarray, groups: int = 3) -> np.ndarray:
    """Assign each row to a predicted-risk tertile (0 = lowest risk)."""
    risk = np.asarray(risk, dtype=float)
    edges = np.quantile(risk, np.linspace(0, 1, groups + 1)[1:-1])
    return np.searchsorted(edges, risk, side="right")
