"""In-silico trials: every patient's twins under each arm, and the treatment effect they imply.

A twin table holds one row per twin: which cohort patient it copies, the arm it was run
under, the ensemble member that wrote it, and its outcome. Twins come from the fusion
ensemble (each twin drawn from one member's predictive distribution, members taking turns)
or from the twin generator (trajectories through the quality gate).

The interval of an effect is a percentile bootstrap over patients (a patient's twins move
together) and, for an ensemble, over its members: each replicate weights every twin by its
patient's and its member's multiplicities, so one pass covers both patient sampling and
model uncertainty. Hazard ratios come from an Efron Cox fit of the arm alone, written for
integer case weights so a replicate is an O(twins) refit rather than a lifelines call; it
equals lifelines' CoxPHFitter on the replicated rows (tests hold it to 1e-6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MEASURES = {"time_to_event": "hazard_ratio", "binary": "risk_ratio", "continuous": "mean_difference"}
MIN_SUBGROUP_PATIENTS = 10
MIN_SUBGROUP_EVENTS = 5  # per arm, among a subgroup's twins
_NEWTON_STEPS = 50


@dataclass(frozen=True)
class TwinTable:
    """Outcomes of every twin of an in-silico trial (one row per twin)."""

    endpoint: str
    patient: np.ndarray  # (T,) int: row of the cohort the twin copies
    arm: np.ndarray  # (T,) int 0/1
    member: np.ndarray  # (T,) int: ensemble member that wrote it (0 for a generator)
    members: int
    time: np.ndarray | None = None  # (T,) days, time-to-event
    event: np.ndarray | None = None  # (T,) 0/1
    y: np.ndarray | None = None  # (T,) binary or continuous outcome
    rejected: int = 0  # twins the quality gate rejected after every retry

    def outcome(self) -> dict[str, np.ndarray]:
        """The twins' outcome columns by name."""
        if self.endpoint == "time_to_event":
            return {"time": self.time, "event": self.event}
        return {"y": self.y}


# -- twins from the fusion ensemble ---------------------------------------------------------------

def predictor_twins(member_outputs: dict[int, np.ndarray], *, endpoint: str, n: int, horizon: float,
                    residual_sd: float, seed: int) -> TwinTable:
    """n twins per patient per arm sampled from the members' predictive distributions.

    member_outputs[arm] holds the ensemble's calibrated outputs (M, B, out_dim) for every
    patient put under that arm: discrete-time hazard logits over equal bins of the horizon,
    a binary logit, or the predicted continuous value. Twin k of a patient is written by
    member k mod M, so every member contributes equally.
    """
    if n < 1:
        raise ValueError(f"twins per patient must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("patient", "arm", "member", "a", "b")}
    members = next(iter(member_outputs.values())).shape[0]
    for arm, out in sorted(member_outputs.items()):
        m_count, b_count, _ = out.shape
        patient = np.repeat(np.arange(b_count), n)  # (B*n,)
        member = np.tile(np.arange(n) % m_count, b_count)
        z = out[member, patient]  # (B*n, out_dim)
        if endpoint == "time_to_event":
            a, b = _sample_discrete_time(z, horizon, rng)
        elif endpoint == "binary":
            a, b = (rng.random(len(z)) < 1 / (1 + np.exp(-z[:, 0]))).astype(float), None
        else:
            a, b = z[:, 0] + residual_sd * rng.standard_normal(len(z)), None
        for key, v in (("patient", patient), ("arm", np.full(len(z), arm)), ("member", member), ("a", a), ("b", b)):
            parts[key].append(v)
    cat = {k: np.concatenate(v) if v and v[0] is not None else None for k, v in parts.items()}
    common = {"endpoint": endpoint, "patient": cat["patient"], "arm": cat["arm"], "member": cat["member"],
              "members": members}
    if endpoint == "time_to_event":
        return TwinTable(**common, time=cat["a"], event=cat["b"])
    return TwinTable(**common, y=cat["a"])


def _sample_discrete_time(logits: np.ndarray, horizon: float, rng: np.random.Generator
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(time, event) from per-bin hazards (T, K): the first bin whose hazard fires, uniform within it."""
    hazard = 1 / (1 + np.exp(-logits))
    fired = rng.random(hazard.shape) < hazard  # (T, K)
    any_event = fired.any(axis=1)
    first = np.where(any_event, fired.argmax(axis=1), logits.shape[1])
    width = horizon / logits.shape[1]
    time = np.where(any_event, (first + rng.random(len(first))) * width, horizon)
    return time, any_event.astype(float)


def generator_table(rows: list[int], arms: list[int], times: list[float], events: list[bool], *,
                    rejected: int) -> TwinTable:
    """A twin table from the generator's gated twins (one model: member 0)."""
    return TwinTable(endpoint="time_to_event", patient=np.asarray(rows, dtype=int), arm=np.asarray(arms, dtype=int),
                     member=np.zeros(len(rows), dtype=int), members=1, time=np.asarray(times, dtype=float),
                     event=np.asarray(events, dtype=float), rejected=rejected)


# -- Cox fit of the arm alone, with integer case weights ------------------------------------------

@dataclass(frozen=True)
class _CoxData:
    """Twins sorted once by time; replicates only change the weights."""

    order: np.ndarray
    time: np.ndarray  # sorted
    event: np.ndarray
    arm: np.ndarray
    tie_start: np.ndarray  # per row: first sorted position with the same time (its risk set start)
    uniq_of_row: np.ndarray  # per row: index of its distinct time


def _cox_data(time: np.ndarray, event: np.ndarray, arm: np.ndarray) -> _CoxData:
    order = np.argsort(time, kind="stable")
    t = time[order]
    uniq, inverse = np.unique(t, return_inverse=True)
    start = np.searchsorted(t, uniq, side="left")
    return _CoxData(order, t, event[order].astype(float), arm[order].astype(float), start, inverse)


def cox_log_hr(time: np.ndarray, event: np.ndarray, arm: np.ndarray, weights: np.ndarray | None = None,
               *, data: _CoxData | None = None) -> tuple[float, float]:
    """(log hazard ratio of arm 1 vs 0, its standard error): Efron ties, integer case weights.

    The same as fitting lifelines' CoxPHFitter on the data with each row repeated `weights`
    times. Returns (nan, nan) when an arm has no events or no patients at risk (the ratio
    is then 0 or infinite).
    """
    d = data or _cox_data(np.asarray(time, float), np.asarray(event, float), np.asarray(arm, float))
    w = np.ones(len(d.order)) if weights is None else np.asarray(weights, float)[d.order]
    if np.any(w < 0) or np.any(w != np.round(w)):
        raise ValueError("case weights must be non-negative integers (bootstrap multiplicities)")
    n_times = len(d.tie_start)
    # per distinct time: weighted at-risk and event counts by arm
    tail0 = np.concatenate([np.cumsum((w * (1 - d.arm))[::-1])[::-1], [0.0]])
    tail1 = np.concatenate([np.cumsum((w * d.arm)[::-1])[::-1], [0.0]])
    r0, r1 = tail0[d.tie_start], tail1[d.tie_start]
    a0 = np.bincount(d.uniq_of_row, weights=w * d.event * (1 - d.arm), minlength=n_times)
    a1 = np.bincount(d.uniq_of_row, weights=w * d.event * d.arm, minlength=n_times)
    deaths = np.rint(a0 + a1).astype(np.int64)
    if a1.sum() == 0 or a0.sum() == 0 or (r0 * r1 == 0)[deaths > 0].all():
        return float("nan"), float("nan")
    # Efron: the l-th of d tied deaths sees the risk set minus l/d of the tied deaths
    slot_time = np.repeat(np.arange(n_times), deaths)
    first_slot = np.repeat(np.cumsum(deaths) - deaths, deaths)
    frac = (np.arange(len(slot_time)) - first_slot) / np.repeat(deaths, deaths)
    base0 = r0[slot_time] - frac * a0[slot_time]
    base1 = r1[slot_time] - frac * a1[slot_time]
    total1 = a1.sum()
    beta, info = 0.0, 0.0
    for _ in range(_NEWTON_STEPS):
        e = np.exp(beta)
        s = base0 + e * base1
        p = e * base1 / s
        score = total1 - p.sum()
        info = float((p * (1 - p)).sum())
        if info <= 0:
            return float("nan"), float("nan")
        step = float(np.clip(score / info, -2.0, 2.0))
        beta += step
        if abs(step) < 1e-10:
            break
    e = np.exp(beta)
    p = e * base1 / (base0 + e * base1)
    info = float((p * (1 - p)).sum())
    return float(beta), float(1 / np.sqrt(info)) if info > 0 else float("nan")


# -- effects from a twin table ---------------------------------------------------------------------

def _effects(tt: TwinTable, w: np.ndarray, cox: _CoxData | None) -> dict[str, float]:
    """The point effect(s) of arm 1 vs 0 among twins weighted by w."""
    if tt.endpoint == "time_to_event":
        beta, _ = cox_log_hr(tt.time, tt.event, tt.arm, w, data=cox)
        return {"hazard_ratio": float(np.exp(beta))}
    means = []
    for a in (0, 1):
        wa = w * (tt.arm == a)
        means.append(float((wa * tt.y).sum() / wa.sum()) if wa.sum() > 0 else float("nan"))
    if tt.endpoint == "binary":
        ratio = means[1] / means[0] if means[0] > 0 else float("nan")
        return {"risk_ratio": ratio, "risk_difference": means[1] - means[0]}
    return {"mean_difference": means[1] - means[0]}


def _arm_summary(tt: TwinTable, mask: np.ndarray) -> dict[str, dict]:
    out = {}
    for a in (0, 1):
        sel = mask & (tt.arm == a)
        entry = {"n": int(sel.sum()), "patients": int(len(np.unique(tt.patient[sel])))}
        if tt.endpoint == "time_to_event":
            entry["events"] = int(tt.event[sel].sum())
        elif tt.endpoint == "binary":
            entry["events"] = int(tt.y[sel].sum())
        else:
            entry["mean"] = float(tt.y[sel].mean()) if sel.any() else None
        out[str(a)] = entry
    return out


def _too_few(tt: TwinTable, mask: np.ndarray, n_patients: int) -> str | None:
    if n_patients < MIN_SUBGROUP_PATIENTS:
        return f"fewer than {MIN_SUBGROUP_PATIENTS} patients"
    if tt.endpoint == "continuous":
        return None
    hits = tt.event if tt.endpoint == "time_to_event" else tt.y
    per_arm = [hits[mask & (tt.arm == a)].sum() for a in (0, 1)]
    if min(per_arm) < MIN_SUBGROUP_EVENTS:
        return f"fewer than {MIN_SUBGROUP_EVENTS} twin events in an arm"
    return None


def trial_effect(tt: TwinTable, *, n_patients: int, subgroups: dict[str, np.ndarray] | None = None,
                 bootstrap: int = 200, alpha: float = 0.05, seed: int = 0, log_effect_se: float = 0.0,
                 on_progress: Callable[[int, int], None] | None = None) -> dict:
    """The effect of arm 1 vs 0 with percentile-bootstrap intervals, overall and per subgroup.

    `log_effect_se` (time to event): the standard error of the model's re-estimated arm effect
    (federated.arm_shift), which every twin of an arm carries alike, so neither patients nor members
    resample it: each replicate also draws the effect from N(estimate, se^2), which moves every
    hazard ratio of the replicate by the same factor (proportional hazards).

    subgroups maps a column name to each patient's label (n_patients,), None for missing.
    Returns {"effect", ["effect_difference"], "arms", "subgroups", "bootstrap", "alpha",
    "bootstrap_failed"}; ratios whose replicate has no events in an arm are left out of its
    interval and counted in bootstrap_failed.
    """
    if bootstrap < 20:
        raise ValueError(f"bootstrap replicates must be at least 20, got {bootstrap}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    groups = [("", "", np.ones(len(tt.patient), dtype=bool), n_patients)]
    notes: dict[int, str] = {}
    for col, labels in (subgroups or {}).items():
        labels = np.asarray(labels, dtype=object)
        for value in sorted({v for v in labels if v is not None}, key=str):
            in_group = np.array([v == value for v in labels])
            mask = in_group[tt.patient]
            note = _too_few(tt, mask, int(in_group.sum()))
            groups.append((col, value, mask, int(in_group.sum())))
            if note:
                notes[len(groups) - 1] = note
    cox = {g: _cox_data(tt.time[m], tt.event[m], tt.arm[m]) for g, (_, _, m, _) in enumerate(groups)
           if tt.endpoint == "time_to_event" and g not in notes}
    sub = {g: TwinTable(tt.endpoint, tt.patient[m], tt.arm[m], tt.member[m], tt.members,
                        *(None if v is None else v[m] for v in (tt.time, tt.event, tt.y)))
           for g, (_, _, m, _) in enumerate(groups) if g not in notes}
    points = {g: _effects(t, np.ones(len(t.patient)), cox.get(g)) for g, t in sub.items()}
    rng = np.random.default_rng(seed)
    reps: dict[int, list[dict[str, float]]] = {g: [] for g in sub}
    for b in range(bootstrap):
        wp = rng.multinomial(n_patients, np.full(n_patients, 1 / n_patients))
        wm = rng.multinomial(tt.members, np.full(tt.members, 1 / tt.members)) if tt.members > 1 else np.ones(1)
        shift = float(np.exp(rng.normal(0.0, log_effect_se))) if log_effect_se > 0 else 1.0
        for g, t in sub.items():
            r = _effects(t, wp[t.patient] * wm[t.member], cox.get(g))
            if tt.endpoint == "time_to_event":
                r["hazard_ratio"] *= shift
            reps[g].append(r)
        if on_progress:
            on_progress(b + 1, bootstrap)
    failed = 0

    def interval(g: int, measure: str) -> dict:
        nonlocal failed
        vals = np.array([r[measure] for r in reps[g]])
        ok = np.isfinite(vals) & (vals > 0 if measure.endswith("ratio") else True)
        if g == 0:
            failed = int((~ok).sum())
        low, high = (np.quantile(vals[ok], [alpha / 2, 1 - alpha / 2]) if ok.sum() >= 10
                     else (float("nan"), float("nan")))
        return {"measure": measure, "estimate": points[g][measure], "ci_low": float(low), "ci_high": float(high)}

    main = MEASURES[tt.endpoint]
    doc = {"effect": interval(0, main)}
    if tt.endpoint == "binary":
        doc["effect_difference"] = interval(0, "risk_difference")
    doc["arms"] = _arm_summary(tt, groups[0][2])
    doc["subgroups"] = []
    for g, (col, value, mask, n) in enumerate(groups[1:], start=1):
        entry = {"column": col, "value": value, "n": n}
        entry.update(interval(g, main) if g not in notes else
                     {"measure": main, "estimate": None, "ci_low": None, "ci_high": None, "note": notes[g]})
        doc["subgroups"].append(entry)
    doc.update(bootstrap=bootstrap, alpha=alpha, bootstrap_failed=failed)
    return doc
