"""Twin evaluation in one place: fidelity, utility and privacy, used by tests, benchmarks and reports.

Every function is pure (no I/O) and deterministic given its inputs; the only randomness (balancing
set sizes for the nearest-neighbour adversarial accuracy) takes a seed. Twins are `PatientRecord`s
whose events with time <= 0 copy the real patient's history and whose events with time > 0 and
`outcomes` are generated; a twin that reached the model horizon without an event has
event=False and time_to_event=horizon, so real outcomes are censored at the same horizon wherever
the two are compared. AUROC is computed from ranks (Mann-Whitney U, ties count one half).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.spatial import cKDTree
from scipy.stats import rankdata

from .record import PatientRecord


def _check_seqs(seqs: Sequence[Sequence[str]], name: str) -> None:
    if not isinstance(seqs, Sequence) or isinstance(seqs, str) or len(seqs) == 0:
        raise ValueError(f"{name} is empty or not a list: pass a non-empty list of tokenized sequences (lists of str)")
    for i, s in enumerate(seqs):
        if isinstance(s, str) or not isinstance(s, Sequence):
            raise ValueError(f"{name}[{i}] is not a list of tokens: pass each sequence as a list of str")


def _vector(x, name: str, *, n: int | None = None) -> np.ndarray:
    v = np.asarray(x, dtype=float)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {v.shape}")
    if n is not None and v.size != n:
        raise ValueError(f"{name} has {v.size} entries but {n} were expected: pass one value per row")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} holds NaN or infinite values: drop or impute them first")
    return v


def _matrix(x, name: str, *, cols: int | None = None) -> np.ndarray:
    m = np.asarray(x, dtype=float)
    if m.ndim == 1 and m.size:
        m = m[:, None]
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (rows x features), got shape {m.shape}")
    if cols is not None and m.shape[1] != cols:
        raise ValueError(f"{name} has {m.shape[1]} features but {cols} were expected: featurize all sets the same way")
    if not np.isfinite(m).all():
        raise ValueError(f"{name} holds NaN or infinite values: impute them first (record_features does)")
    return m


def _records(records: Sequence[PatientRecord], name: str) -> None:
    if not isinstance(records, Sequence) or len(records) == 0:
        raise ValueError(f"{name} is empty: pass a non-empty list of PatientRecord")
    for i, r in enumerate(records):
        if not isinstance(r, PatientRecord):
            raise ValueError(f"{name}[{i}] is a {type(r).__name__}, not a PatientRecord")



def r2_score(truth: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination 1 - SS_res/SS_tot of `pred` against `truth`."""
    truth, pred = np.asarray(truth, dtype=float), np.asarray(pred, dtype=float)
    ss_res = float(((pred - truth) ** 2).sum())
    ss_tot = float(((truth - truth.mean()) ** 2).sum())
    if ss_tot == 0.0:  # constant truth: R^2 is undefined; scikit-learn's convention keeps it finite
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def _frequency_r2(real: Counter, synth: Counter, what: str) -> float:
    if not real:
        raise ValueError(f"real sequences hold no {what}: pass longer sequences")
    if not synth:
        raise ValueError(f"synthetic sequences hold no {what}: pass longer sequences")
    types = sorted(set(real) | set(synth))  # a type one side never produces counts as frequency 0 there
    r = np.array([real[t] for t in types], dtype=float)
    s = np.array([synth[t] for t in types], dtype=float)
    return r2_score(r / r.sum(), s / s.sum())


def unigram_r2(real_seqs: Sequence[Sequence[str]], synth_seqs: Sequence[Sequence[str]], *,
               ignore: Iterable[str] = ()) -> float:
    """R^2 of synthetic token frequencies against real ones over the union of token types."""
    _check_seqs(real_seqs, "real_seqs")
    _check_seqs(synth_seqs, "synth_seqs")
    skip = set(ignore)
    count = lambda seqs: Counter(t for s in seqs for t in s if t not in skip)  # noqa: E731
    return _frequency_r2(count(real_seqs), count(synth_seqs), "tokens")


def bigram_r2(real_seqs: Sequence[Sequence[str]], synth_seqs: Sequence[Sequence[str]], *,
              ignore: Iterable[str] = ()) -> float:
    """R^2 of synthetic consecutive-token-pair frequencies against real ones (pairs never cross sequences)."""
    _check_seqs(real_seqs, "real_seqs")
    _check_seqs(synth_seqs, "synth_seqs")
    skip = set(ignore)

    def count(seqs):
        c: Counter = Counter()
        for s in seqs:
            kept = [t for t in s if t not in skip]
            c.update(zip(kept[:-1], kept[1:]))
        return c

    return _frequency_r2(count(real_seqs), count(synth_seqs), "token pairs")


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    v = np.asarray(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def visit_marginals(real: Sequence[PatientRecord], twins: Sequence[PatientRecord], codes: Sequence[str],
                    bins_days: Sequence[float] = (0, 90, 180, 365, 730, 1095)) -> list[dict]:
    """Mean and sd of each code's values per follow-up window (lo, hi], real against twins.

    One dict per (code, window): code, window [lo, hi], real_n/real_mean/real_sd, twin_n/twin_mean/
    twin_sd and smd (standardized mean difference, twin minus real over the pooled sd). Values
    are pooled over all measurements in the window; statistics without data are None so the
    result serializes to JSON as is.
    """
    _records(real, "real")
    _records(twins, "twins")
    if not codes:
        raise ValueError("codes is empty: name at least one event code to compare")
    edges = np.asarray(bins_days, dtype=float)
    if edges.ndim != 1 or edges.size < 2 or not (np.diff(edges) > 0).all():
        raise ValueError(f"bins_days must be at least two strictly increasing day offsets, got {tuple(bins_days)}")

    def collect(records):
        out = {(c, w): [] for c in codes for w in range(edges.size - 1)}
        for r in records:
            for e in r.events:
                if e.value is None or e.time <= edges[0] or e.time > edges[-1] or (e.code, 0) not in out:
                    continue
                w = int(np.searchsorted(edges, e.time, side="left")) - 1  # right-closed windows (lo, hi]
                out[(e.code, w)].append(e.value)
        return out

    got_real, got_twin = collect(real), collect(twins)
    rows = []
    for c in codes:
        for w in range(edges.size - 1):
            rv, tv = got_real[(c, w)], got_twin[(c, w)]
            (rm, rs), (tm, ts) = _mean_sd(rv), _mean_sd(tv)
            smd = None
            if rs is not None and ts is not None and (rs > 0 or ts > 0):
                smd = (tm - rm) / math.sqrt((rs ** 2 + ts ** 2) / 2)
            rows.append({"code": c, "window": [float(edges[w]), float(edges[w + 1])],
                         "real_n": len(rv), "real_mean": rm, "real_sd": rs,
                         "twin_n": len(tv), "twin_mean": tm, "twin_sd": ts, "smd": smd})
    return rows


def _censor_at(time: np.ndarray, event: np.ndarray, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    # twins cannot live past the horizon, so real follow-up beyond it would bias any comparison
    return np.minimum(time, horizon), (event > 0.5) & (time <= horizon)


def km_comparison(real_time, real_event, twin_time, twin_event, horizon: float, grid: int = 50) -> dict:
    """Kaplan-Meier curves of real patients and twins on a common grid, their max gap and the logrank p.

    Pass real patients and twins of the same arm. Both sides are censored at `horizon`. Returns
    {"grid", "real", "twin"} as lists of floats, "max_abs_diff" and "logrank_p".
    """
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    rt = _vector(real_time, "real_time")
    re = _vector(real_event, "real_event", n=rt.size)
    tt = _vector(twin_time, "twin_time")
    te = _vector(twin_event, "twin_event", n=tt.size)
    if not (np.isfinite(horizon) and horizon > 0):
        raise ValueError(f"horizon must be a positive number of days, got {horizon}")
    if grid < 2:
        raise ValueError(f"grid must be at least 2 points, got {grid}")
    if (rt < 0).any() or (tt < 0).any():
        raise ValueError("event times must be >= 0 days since index")
    rt, re = _censor_at(rt, re, horizon)
    tt, te = _censor_at(tt, te, horizon)
    points = np.linspace(0.0, float(horizon), int(grid))
    s_real = KaplanMeierFitter().fit(rt, re).survival_function_at_times(points).to_numpy()
    s_twin = KaplanMeierFitter().fit(tt, te).survival_function_at_times(points).to_numpy()
    p = float(logrank_test(rt, tt, event_observed_A=re, event_observed_B=te).p_value)
    return {"grid": points.tolist(), "real": s_real.tolist(), "twin": s_twin.tolist(),
            "max_abs_diff": float(np.abs(s_real - s_twin).max()), "logrank_p": p}


def _outcome_arrays(records: Sequence[PatientRecord]) -> tuple[np.ndarray, np.ndarray]:
    t, e = [], []
    for r in records:
        if r.outcomes.time_to_event is None:
            raise ValueError(f"record {r.patient_id} has no time-to-event outcome: Kaplan-Meier needs one per record")
        t.append(r.outcomes.time_to_event)
        e.append(float(bool(r.outcomes.event)))
    return np.asarray(t), np.asarray(e)


def km_by_arm(real: Sequence[PatientRecord], twins: Sequence[PatientRecord], horizon: float,
              grid: int = 50) -> dict[str, dict]:
    """`km_comparison` of twins against real patients of the same arm, keyed by arm name ("CONTROL", ...)."""
    _records(real, "real")
    _records(twins, "twins")
    out = {}
    for arm in sorted({r.arm for r in twins}, key=lambda a: -1 if a is None else int(a)):
        rs, ts = [r for r in real if r.arm == arm], [r for r in twins if r.arm == arm]
        name = "NONE" if arm is None else arm.name
        if not rs:
            raise ValueError(f"twins of arm {name} have no real patients of that arm to compare with")
        out[name] = km_comparison(*_outcome_arrays(rs), *_outcome_arrays(ts), horizon, grid)
    return out



def _numeric_baseline_keys(records: Sequence[PatientRecord]) -> list[str]:
    keys = set(records[0].baseline)
    for r in records[1:]:
        keys &= set(r.baseline)
    numeric = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, str))  # noqa: E731
    return sorted(k for k in keys if all(numeric(r.baseline[k]) for r in records)
                  and any(r.baseline[k] is not None for r in records))


def record_feature_names(records: Sequence[PatientRecord], codes: Sequence[str], *,
                         reference: Sequence[PatientRecord] | None = None, include_future: bool = True,
                         include_outcomes: bool = True) -> list[str]:
    """Column names of `record_features` with the same arguments."""
    _records(records, "records")
    ref = records if reference is None else reference
    _records(ref, "reference")
    names = [f"baseline:{k}" for k in _numeric_baseline_keys(ref)] + ["arm"]
    names += [f"last:{c}" for c in codes]
    if include_future:
        names += [f"future_mean:{c}" for c in codes] + ["future_visits"]
    if include_outcomes:
        names += ["outcome_time", "outcome_event"]
    return names


def _raw_features(records, keys, codes, horizon, include_future, include_outcomes) -> np.ndarray:
    rows = []
    for r in records:
        row = [float("nan") if r.baseline.get(k) is None or isinstance(r.baseline.get(k), str)
               else float(r.baseline[k]) for k in keys]
        row.append(float("nan") if r.arm is None else float(int(r.arm)))
        last: dict[str, float] = {}
        future: dict[str, list[float]] = {c: [] for c in codes}
        times = set()
        for e in sorted(r.events, key=lambda e: e.time):
            if e.time <= 0:
                if e.value is not None:
                    last[e.code] = e.value  # time order: the latest history value wins
            elif e.time <= horizon:
                times.add(e.time)
                if e.value is not None and e.code in future:
                    future[e.code].append(e.value)
        row += [last.get(c, float("nan")) for c in codes]
        if include_future:
            row += [float(np.mean(future[c])) if future[c] else float("nan") for c in codes]
            row.append(float(len(times)))  # a visit is a distinct event time
        if include_outcomes:
            t, ev = r.outcomes.time_to_event, r.outcomes.event
            if t is None:
                row += [float("nan"), float("nan")]
            else:
                row += [min(t, horizon), float(bool(ev) and t <= horizon)]
        rows.append(row)
    return np.asarray(rows, dtype=float)


def record_features(records: Sequence[PatientRecord], codes: Sequence[str], horizon: float, *,
                    reference: Sequence[PatientRecord] | None = None, include_future: bool = True,
                    include_outcomes: bool = True) -> np.ndarray:
    """Fixed-length standardized summary of each patient or twin (rows x `record_feature_names`).

    Columns: numeric baseline covariates present in every reference record, arm, last history
    value per code, mean future value per code within `horizon`, number of future visits, outcome
    time and event (both censored at `horizon`, as twins are). NaN is filled with the reference
    column mean, then every column is standardized with the reference mean and sd, so real
    training patients, twins and held-out patients share one scale: featurize each of them with
    `reference=` the real training records. Drop the future and outcome columns
    (include_future/include_outcomes=False) when the features are Cox covariates.
    """
    _records(records, "records")
    ref = records if reference is None else reference
    _records(ref, "reference")
    if not (np.isfinite(horizon) and horizon > 0):
        raise ValueError(f"horizon must be a positive number of days, got {horizon}")
    codes = list(codes)
    keys = _numeric_baseline_keys(ref)
    args = (keys, codes, float(horizon), include_future, include_outcomes)
    ref_x = _raw_features(ref, *args)
    x = ref_x if ref is records else _raw_features(records, *args)
    with np.errstate(invalid="ignore"):
        counts = (~np.isnan(ref_x)).sum(0)
        mean = np.where(counts > 0, np.nansum(ref_x, 0) / np.maximum(counts, 1), 0.0)  # all-NaN column -> 0
    ref_filled = np.where(np.isnan(ref_x), mean, ref_x)
    sd = ref_filled.std(0)
    sd = np.where(sd > 0, sd, 1.0)  # a constant column stays constant (0) rather than dividing by zero
    return (np.where(np.isnan(x), mean, x) - mean) / sd



def _fit_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, name: str):
    import pandas as pd
    from lifelines import CoxPHFitter

    if not (event > 0.5).any():
        raise ValueError(f"{name} has no events: a Cox model cannot be fitted without any")
    keep = x.std(0) > 0  # a constant column has no coefficient and stalls lifelines' Newton steps
    if not keep.any():
        raise ValueError(f"every feature of {name} is constant: a Cox model needs at least one varying covariate")
    df = pd.DataFrame(x[:, keep], columns=[f"x{i}" for i in np.flatnonzero(keep)])
    df["T"], df["E"] = time, (event > 0.5).astype(float)
    return CoxPHFitter(penalizer=0.1).fit(df, "T", "E"), keep


def _cox_c_index(model, keep, test_x, test_time, test_event) -> float:
    import pandas as pd
    from lifelines.utils import concordance_index

    df = pd.DataFrame(test_x[:, keep], columns=[f"x{i}" for i in np.flatnonzero(keep)])
    return float(concordance_index(test_time, -model.predict_partial_hazard(df).to_numpy(), test_event))


def tstr_trtr(train_real_X, train_real_time, train_real_event, synth_X, synth_time, synth_event,
              test_X, test_time, test_event) -> dict[str, float]:
    """C-index on real test patients of a Cox model trained on synthetic (tstr) vs real (trtr) data."""
    rx = _matrix(train_real_X, "train_real_X")
    k = rx.shape[1]
    sx, tx = _matrix(synth_X, "synth_X", cols=k), _matrix(test_X, "test_X", cols=k)
    rt = _vector(train_real_time, "train_real_time", n=len(rx))
    re = _vector(train_real_event, "train_real_event", n=len(rx))
    st, se = _vector(synth_time, "synth_time", n=len(sx)), _vector(synth_event, "synth_event", n=len(sx))
    tt, te = _vector(test_time, "test_time", n=len(tx)), _vector(test_event, "test_event", n=len(tx))
    if not (te > 0.5).any():
        raise ValueError("test_event has no events: the C-index needs at least one observed event")
    real_model = _fit_cox(rx, rt, re, "real training data")
    synth_model = _fit_cox(sx, st, se, "synthetic training data")
    return {"tstr": _cox_c_index(*synth_model, tx, tt, te), "trtr": _cox_c_index(*real_model, tx, tt, te)}


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1.0):
    """L2-penalized logistic regression (intercept unpenalized) on standardized x; returns a scoring function."""
    x, y = _matrix(x, "x"), _vector(y, "y")
    if y.size != x.shape[0]:
        raise ValueError(f"y has {y.size} labels but x has {x.shape[0]} rows")
    if not np.isin(y, (0.0, 1.0)).all() or y.min() == y.max():
        raise ValueError("y must hold 0/1 labels with both classes present")
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    z = np.hstack([np.ones((x.shape[0], 1)), (x - mu) / sd])  # column 0: intercept

    def loss(w):
        m = z @ w
        nll = np.logaddexp(0.0, m).sum() - y @ m
        g = z.T @ (1.0 / (1.0 + np.exp(-m)) - y)
        g[1:] += l2 * w[1:]
        return nll + 0.5 * l2 * float(w[1:] @ w[1:]), g

    w = minimize(loss, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B").x
    return lambda new: ((np.asarray(new, dtype=float) - mu) / sd) @ w[1:] + w[0]  # logit


def tstr_trtr_binary(train_real_X, train_real_y, synth_X, synth_y, test_X, test_y, *,
                     l2: float = 1.0) -> dict[str, float]:
    """AUROC on real test patients of a logistic model trained on synthetic (tstr) vs real (trtr) data."""
    rx = _matrix(train_real_X, "train_real_X")
    k = rx.shape[1]
    sx, tx = _matrix(synth_X, "synth_X", cols=k), _matrix(test_X, "test_X", cols=k)
    ry = _vector(train_real_y, "train_real_y", n=rx.shape[0])
    sy = _vector(synth_y, "synth_y", n=sx.shape[0])
    ty = _vector(test_y, "test_y", n=tx.shape[0])
    return {"tstr": auroc(ty, fit_logistic(sx, sy, l2=l2)(tx)), "trtr": auroc(ty, fit_logistic(rx, ry, l2=l2)(tx))}



def _two_sample_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    # Mann-Whitney U from average ranks: a tied (pos, neg) pair counts one half
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def auroc(labels, scores) -> float:
    """Area under the ROC curve of `scores` for 0/1 `labels` (rank formula, ties count one half)."""
    y = _vector(labels, "labels")
    s = _vector(scores, "scores", n=y.size)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if y.min() == y.max():
        raise ValueError("labels hold a single class: AUROC needs positives and negatives")
    return _two_sample_auc(s[y == 1], s[y == 0])


def _nearest(points: np.ndarray, tree: cKDTree, *, leave_one_out: bool = False) -> np.ndarray:
    # with leave-one-out the query set is the tree's own data: the 1st neighbour is the point itself
    # (or an exact duplicate, at distance 0 either way), so the 2nd is the nearest other record
    d, _ = tree.query(points, k=2 if leave_one_out else 1)
    return d[:, 1] if leave_one_out else d


def mia_distance_auc(member_X, nonmember_X, synth_X) -> float:
    """Membership-inference AUC of the distance attack: score = -distance to the nearest synthetic record.

    0.5 means training members sit no closer to the twins than unseen patients; 1.0 a full leak.
    """
    mx = _matrix(member_X, "member_X")
    k = mx.shape[1]
    nx, sx = _matrix(nonmember_X, "nonmember_X", cols=k), _matrix(synth_X, "synth_X", cols=k)
    tree = cKDTree(sx)
    return _two_sample_auc(-_nearest(mx, tree), -_nearest(nx, tree))


def mia_likelihood_auc(member_nll, nonmember_nll) -> float:
    """Membership-inference AUC of the likelihood attack: score = -negative log-likelihood under the model."""
    m = _vector(member_nll, "member_nll")
    n = _vector(nonmember_nll, "nonmember_nll")
    return _two_sample_auc(-m, -n)


def nnaa(real_X, synth_X, *, balance: bool = True, seed: int = 0) -> float:
    """Nearest-neighbour adversarial accuracy (Yale et al. 2020); about 0.5 is ideal.

    AA = 0.5 * (mean_i[d_TS(i) > d_TT(i)] + mean_j[d_ST(j) > d_SS(j)]) with Euclidean distances:
    d_TS(i) from real record i to its nearest synthetic record, d_TT(i) to its nearest other real
    record (leave-one-out), and symmetrically d_ST, d_SS for synthetic record j. It is the accuracy
    of a 1-nearest-neighbour classifier telling real from synthetic. 0.5: the sets are
    indistinguishable; near 1: twins are far from real data (poor fidelity); well below 0.5: twins
    sit closer to real records than real records sit to each other, the sign of memorisation
    (exact copies give d_TS = d_ST = 0, every strict comparison is false and AA = 0). Unequal set
    sizes bias AA (the larger set is denser), so with `balance` the larger set is subsampled to the
    size of the smaller one with a seeded generator.
    """
    rx = _matrix(real_X, "real_X")
    sx = _matrix(synth_X, "synth_X", cols=rx.shape[1])
    if rx.shape[0] < 2 or sx.shape[0] < 2:
        raise ValueError("nnaa needs at least 2 real and 2 synthetic records (leave-one-out distances)")
    if balance and rx.shape[0] != sx.shape[0]:
        rng = np.random.default_rng(seed)
        n = min(rx.shape[0], sx.shape[0])
        rx = rx[np.sort(rng.choice(rx.shape[0], n, replace=False))]
        sx = sx[np.sort(rng.choice(sx.shape[0], n, replace=False))]
    real_tree, synth_tree = cKDTree(rx), cKDTree(sx)
    d_ts, d_tt = _nearest(rx, synth_tree), _nearest(rx, real_tree, leave_one_out=True)
    d_st, d_ss = _nearest(sx, real_tree), _nearest(sx, synth_tree, leave_one_out=True)
    return 0.5 * (float(np.mean(d_ts > d_tt)) + float(np.mean(d_st > d_ss)))



def _json_number(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None  # JSON has no NaN
    return v


def summarize(fidelity: Mapping, utility: Mapping, privacy: Mapping, *, extra: Mapping | None = None) -> dict:
    """The report shape `evoclone twins evaluate --json` prints.

    {"fidelity": {"unigram_r2", "bigram_r2"}, "utility": {"tstr", "trtr"}, "privacy": {"mia_auc",
    "nnaa"}} where mia_auc is the larger (worse) of "mia_distance_auc" and "mia_likelihood_auc"
    among those given (or "mia_auc" itself); any other keys of each section follow the required
    ones, and `extra` adds top-level keys. Non-finite numbers become None.
    """
    priv = dict(privacy)
    attacks = [priv[k] for k in ("mia_distance_auc", "mia_likelihood_auc") if priv.get(k) is not None]
    if attacks:
        priv["mia_auc"] = max(float(a) for a in attacks)
    out: dict = {}
    for section, given, required in (("fidelity", fidelity, ("unigram_r2", "bigram_r2")),
                                     ("utility", utility, ("tstr", "trtr")), ("privacy", priv, ("mia_auc", "nnaa"))):
        missing = [k for k in required if k not in given]
        if section == "privacy" and "mia_auc" in missing:
            missing[missing.index("mia_auc")] = "mia_auc (or mia_distance_auc / mia_likelihood_auc)"
        if missing:
            raise ValueError(f"summarize: {section} lacks {', '.join(missing)}: compute it before summarizing")
        out[section] = {k: _json_number(given[k]) for k in required}
        out[section].update({k: _json_number(v) for k, v in given.items() if k not in required})
    for k, v in (extra or {}).items():
        if k in out:
            raise ValueError(f"summarize: extra key {k!r} would overwrite the {k} section; rename it")
        out[k] = _json_number(v)
    return out
