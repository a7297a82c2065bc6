"""Evaluation metrics.

The C-index is computed here in NumPy (ClientApps start a fresh process per message and
importing lifelines there costs seconds); tests check it against lifelines to the digit.
Kaplan-Meier curves come from lifelines, imported where used.
"""

from __future__ import annotations

import numpy as np


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray, *, chunk: int = 2048) -> float:
    """Harrell's C-index with lifelines' conventions; `risk` higher means earlier events.

    A pair (i, j) is comparable when i had the event and j left later, or j was censored at
    the same time; tied risks count one half. NaN when no pair is comparable.
    """
    t = np.asarray(time, dtype=float)
    e = np.asarray(event, dtype=float) > 0.5
    r = np.asarray(risk, dtype=float)
    if not (len(t) == len(e) == len(r)):
        raise ValueError("time, event and risk must have the same length")
    pairs = concordant = 0.0
    died = np.flatnonzero(e)
    for start in range(0, len(died), chunk):
        i = died[start:start + chunk]
        ti, ri = t[i][:, None], r[i][:, None]
        comparable = (t[None, :] > ti) | ((t[None, :] == ti) & ~e[None, :])
        pairs += comparable.sum()
        concordant += (comparable & (ri > r[None, :])).sum() + 0.5 * (comparable & (ri == r[None, :])).sum()
    return float(concordant / pairs) if pairs else float("nan")


def kaplan_meier(time: np.ndarray, event: np.ndarray, *, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """Observed survival curve (times, survival probabilities) up to `horizon` (lifelines)."""
    from lifelines import KaplanMeierFitter

    km = KaplanMeierFitter().fit(np.asarray(time, dtype=float), np.asarray(event, dtype=float))
    sf = km.survival_function_
    t = sf.index.to_numpy()
    keep = t <= horizon
    return t[keep], sf.iloc[:, 0].to_numpy()[keep]


def risk_groups(risk: np.ndarray, groups: int = 3) -> np.ndarray:
    """Assign each row to a predicted-risk quantile group (0 = lowest risk)."""
    risk = np.asarray(risk, dtype=float)
    edges = np.quantile(risk, np.linspace(0, 1, groups + 1)[1:-1])
    return np.searchsorted(edges, risk, side="right")
