"""Treatment effects of a randomized trial, unadjusted and adjusted for a prognostic score.

The statistics behind `evoclone analyze procova` (Schuler et al., "Increasing the efficiency
of randomized trial estimates via linear adjustment for a prognostic score", Int J Biostat
2022; EMA qualification opinion 2022). Every estimate is a reference-library fit:

- continuous: statsmodels OLS of y on intercept + arm (+ covariates), the ANCOVA mean
  difference with the conventional OLS standard error and t-based interval;
- binary: statsmodels Logit of y on intercept + arm (+ covariates), turned into the marginal
  risk difference by standardization (the average over all patients of the predicted risk
  on treatment minus on control) with its delta-method standard error, as statsmodels'
  `get_margeff(at="overall", dummy=True)` computes it; unadjusted this is p1 - p0;
- time_to_event: lifelines' Cox model (Efron ties) of (time, event) on arm (+ covariates),
  the hazard ratio with a Wald interval on the log scale.

Inputs are arrays, outputs plain dataclasses and dicts; nothing is rounded and nothing is
read or written.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from evoclone.federated.sample_size import compare

ENDPOINTS = ("time_to_event", "binary", "continuous")
MIN_EVENTS = 10
# Efficiency gains past this are not credible and would make the sample-size solver divide by ~0.
MAX_GAIN = 0.99


class EffectInputError(ValueError):
    """Trial data an effect cannot be estimated from (one-line message)."""


@dataclass(frozen=True)
class EffectEstimate:
    """One treatment-effect estimate with its standard error, interval and p-value."""

    measure: str
    estimate: float
    se: float  # on the estimation scale: the difference itself, or log(hazard ratio)
    ci_low: float
    ci_high: float
    p_value: float
    n: int

    def to_dict(self) -> dict:
        """All fields as plain Python values (floats as float)."""
        return {"measure": self.measure, "estimate": float(self.estimate), "se": float(self.se),
                "ci_low": float(self.ci_low), "ci_high": float(self.ci_high), "p_value": float(self.p_value),
                "n": int(self.n)}


def _numeric(name: str, values) -> np.ndarray:
    """`values` as a float array, or EffectInputError (text labels, None)."""
    try:
        return np.asarray(values, dtype=float)
    except (TypeError, ValueError) as e:
        raise EffectInputError(f"{name} must be numeric ({e}); code labels as numbers, e.g. arm 0/1") from None


def _vector(name: str, values, n: int | None) -> np.ndarray:
    """One finite float column of the expected length, or EffectInputError."""
    x = _numeric(name, values)
    if x.ndim != 1:
        raise EffectInputError(f"{name} must be one value per patient (1-D), got shape {x.shape}")
    if n is not None and len(x) != n:
        raise EffectInputError(f"{name} has {len(x)} values but arm has {n}: pass one row per patient in the same order")
    _finite(name, x)
    return x


def _finite(name: str, x: np.ndarray) -> None:
    """EffectInputError naming how many rows of `x` are missing or infinite."""
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(len(x), -1).any(axis=1))
        raise EffectInputError(f"{name} has {len(rows)} missing or infinite row(s) (first at row {rows[0]}); "
                               "drop incomplete patients and report how many before estimating the effect")


def _arm(arm) -> np.ndarray:
    """Arm as a 0/1 float vector holding both arms, or EffectInputError."""
    a = _vector("arm", arm, None)
    levels = np.unique(a)
    if not np.isin(levels, (0.0, 1.0)).all():
        shown = ", ".join(f"{v:g}" for v in levels[:5]) + (", ..." if len(levels) > 5 else "")
        raise EffectInputError(f"arm holds the values {{{shown}}}; code it as 0 (control) and 1 (treatment)")
    if len(levels) < 2:
        raise EffectInputError(f"arm holds only {levels[0]:g}: both arms (0 = control, 1 = treatment) need patients")
    return a


def _covariates(adjust, n: int) -> np.ndarray:
    """Adjustment covariates as an (n, k) float matrix, or EffectInputError."""
    x = _numeric("adjust", adjust)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] == 0:
        raise EffectInputError(f"adjust must be an (n,) or (n, k) covariate matrix, got shape {x.shape}")
    if x.shape[0] != n:
        raise EffectInputError(f"adjust has {x.shape[0]} rows but arm has {n}: pass one row per patient in the same order")
    _finite("adjust", x)
    return x


def _design(a: np.ndarray, covs: np.ndarray | None) -> np.ndarray:
    """Intercept, arm and covariates; EffectInputError if a column is redundant."""
    x = np.column_stack([np.ones_like(a), a] + ([] if covs is None else [covs]))
    if np.linalg.matrix_rank(x) < x.shape[1]:
        raise EffectInputError("adjust is constant or collinear with the arm or another covariate "
                               "(for example a score identical in every patient): drop the redundant column")
    return x


def _check_alpha(alpha: float) -> None:
    """EffectInputError unless 0 < alpha <= 0.5."""
    if isinstance(alpha, bool) or not (isinstance(alpha, numbers.Real) and 0 < alpha <= 0.5):
        raise EffectInputError(f"alpha={alpha!r}: the two-sided significance level must be in (0, 0.5], e.g. 0.05")


def _continuous(y: np.ndarray, x: np.ndarray, alpha: float) -> EffectEstimate:
    """ANCOVA mean difference: OLS coefficient of arm (column 1) with statsmodels' t inference."""
    import statsmodels.api as sm

    if np.ptp(y) == 0:
        raise EffectInputError(f"y is {y[0]:g} in every patient: a continuous outcome needs variation")
    res = sm.OLS(y, x).fit()
    low, high = res.conf_int(alpha)[1]
    return EffectEstimate("mean_difference", float(res.params[1]), float(res.bse[1]), float(low), float(high),
                          float(res.pvalues[1]), len(y))


def _not_converged(what: str) -> EffectInputError:
    """The one error every failed model fit becomes."""
    return EffectInputError(f"the {what} did not converge, usually separation (the arm or a covariate predicts "
                            "the outcome almost perfectly); drop that covariate, use a coarser score, or analyse unadjusted")


def _binary(y: np.ndarray, x: np.ndarray, alpha: float) -> EffectEstimate:
    """Marginal risk difference by standardization over a logistic fit, delta-method SE."""
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationError, PerfectSeparationWarning

    with warnings.catch_warnings():
        # statsmodels only warns on separation; here it must stop the analysis.
        warnings.simplefilter("error", PerfectSeparationWarning)
        warnings.simplefilter("error", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow in exp while diverging; judged below
        try:
            res = sm.Logit(y, x).fit(disp=0, maxiter=100)
            mfx = res.get_margeff(at="overall", dummy=True)
        except (PerfectSeparationError, PerfectSeparationWarning, ConvergenceWarning, np.linalg.LinAlgError) as e:
            raise _not_converged("logistic regression") from e
    # get_margeff drops the intercept, so the arm (design column 1) is its first effect.
    est, se = float(mfx.margeff[0]), float(mfx.margeff_se[0])
    if not (res.mle_retvals.get("converged", True) and math.isfinite(est) and math.isfinite(se) and se > 0):
        raise _not_converged("logistic regression")
    low, high = mfx.conf_int(alpha)[0]
    return EffectEstimate("risk_difference", est, se, float(low), float(high), float(mfx.pvalues[0]), len(y))


def _time_to_event(time: np.ndarray, event: np.ndarray, x: np.ndarray, alpha: float) -> EffectEstimate:
    """Cox hazard ratio of arm (Efron ties), Wald interval on the log scale."""
    import pandas as pd
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError, ConvergenceWarning

    # Drop the intercept: the baseline hazard absorbs it.
    df = pd.DataFrame(x[:, 1:], columns=["arm"] + [f"adjust_{j}" for j in range(x.shape[1] - 2)])
    df["time"], df["event"] = time, event
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        try:
            cph = CoxPHFitter(alpha=alpha).fit(df, duration_col="time", event_col="event")
        except ConvergenceError as e:
            raise _not_converged("Cox model") from e
    # Pre-fit heuristics (low variance, rank correlation with time) also arrive as ConvergenceWarning and
    # often fit fine; only the Newton-Raphson verdicts on the fit itself fail it.
    failed = [w for w in caught if issubclass(w.category, ConvergenceWarning)
              and ("Newton-Raphson" in str(w.message) or "suspiciously close to 0" in str(w.message))]
    # params_ and standard_errors_ are what lifelines' summary is built from, without its overhead.
    coef, se = float(cph.params_["arm"]), float(cph.standard_errors_["arm"])
    if failed or not (math.isfinite(coef) and math.isfinite(se) and se > 0):
        raise _not_converged("Cox model")
    normal = NormalDist()
    z = normal.inv_cdf(1 - alpha / 2)
    p = 2 * normal.cdf(-abs(coef / se))
    return EffectEstimate("hazard_ratio", math.exp(coef), se, math.exp(coef - z * se), math.exp(coef + z * se), p,
                          len(time))


def _outcome(endpoint: str, n: int, y, time, event) -> dict[str, np.ndarray]:
    """Validated outcome columns for the endpoint, or EffectInputError."""
    if endpoint not in ENDPOINTS:
        raise EffectInputError(f"unknown endpoint {endpoint!r}: use one of {', '.join(ENDPOINTS)}")
    if endpoint == "time_to_event":
        if time is None or event is None:
            raise EffectInputError("a time_to_event effect needs both time and event (1 = event, 0 = censored)")
        t, e = _vector("time", time, n), _vector("event", event, n)
        if (t < 0).any():
            raise EffectInputError(f"time has {(t < 0).sum()} negative value(s) (first at row "
                                   f"{np.flatnonzero(t < 0)[0]}): times are durations from randomization")
        if not np.isin(e, (0.0, 1.0)).all():
            raise EffectInputError("event must be 0 (censored) or 1 (event) for every patient")
        if e.sum() == 0:
            raise EffectInputError("every patient is censored: a hazard ratio needs observed events")
        if e.sum() < MIN_EVENTS:
            raise EffectInputError(f"only {int(e.sum())} events, fewer than {MIN_EVENTS}: "
                                   "the hazard ratio is not estimable yet; wait for more follow-up")
        return {"time": t, "event": e}
    if y is None:
        raise EffectInputError(f"a {endpoint} effect needs the outcome y")
    v = _vector("y", y, n)
    if endpoint == "binary":
        if not np.isin(v, (0.0, 1.0)).all():
            raise EffectInputError("binary y must be 0 or 1 for every patient; "
                                   "dichotomize the outcome or use the continuous endpoint")
        if np.ptp(v) == 0:
            raise EffectInputError(f"binary y is {v[0]:g} in every patient: a risk difference needs both outcomes")
        # Few of either outcome leaves the logistic fit (and its normal interval) unreliable.
        rare, count = ("positives", int(v.sum())) if v.sum() <= len(v) / 2 else ("negatives", int(len(v) - v.sum()))
        if count < MIN_EVENTS:
            raise EffectInputError(f"only {count} {rare} in y, fewer than {MIN_EVENTS}: "
                                   "the risk difference is not estimable reliably; pool more patients")
    return {"y": v}


def estimate_effect(endpoint: str, *, arm, y=None, time=None, event=None, adjust=None,
                    alpha: float = 0.05) -> EffectEstimate:
    """Treatment effect (arm 1 vs 0) for the endpoint, optionally adjusted for covariates."""
    _check_alpha(alpha)
    a = _arm(arm)
    out = _outcome(endpoint, len(a), y, time, event)
    x = _design(a, None if adjust is None else _covariates(adjust, len(a)))
    if endpoint == "continuous":
        return _continuous(out["y"], x, alpha)
    if endpoint == "binary":
        return _binary(out["y"], x, alpha)
    return _time_to_event(out["time"], out["event"], x, alpha)


def _prognostic(endpoint: str, a: np.ndarray, score: np.ndarray, out: dict[str, np.ndarray]) -> dict:
    """How well the score predicts the outcome: within-arm r2, AUROC or C-index."""
    if endpoint == "continuous":
        import statsmodels.api as sm

        # Residualizing on arm gives the within-arm correlation: Schuler's rho.
        x = np.column_stack([np.ones_like(a), a])
        ry, rs = sm.OLS(out["y"], x).fit().resid, sm.OLS(score, x).fit().resid
        return {"metric": "r2", "value": float(np.corrcoef(ry, rs)[0, 1] ** 2)}
    if endpoint == "binary":
        from scipy.stats import mannwhitneyu

        pos, neg = score[out["y"] == 1], score[out["y"] == 0]
        # Mann-Whitney U of the positives (ties count one half) is the AUROC times the pair count.
        return {"metric": "auroc", "value": float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))}
    from lifelines.utils import concordance_index

    # lifelines scores concordance of survival predictions; a higher score means an earlier event.
    return {"metric": "c_index", "value": float(concordance_index(out["time"], -score, out["event"]))}


def procova(endpoint: str, *, arm, score, y=None, time=None, event=None, alpha: float = 0.05,
            power: float = 0.8) -> dict:
    """Unadjusted and prognostic-score-adjusted effects, the score's quality and the efficiency gain.

    variance_reduction = 1 - se_adjusted^2 / se_unadjusted^2 on the estimation scale.
    sample_size_reduction = 1 - n_adjusted / n_unadjusted from `sample_size.compare` at this
    trial's minimal detectable effect: with the trial's arms n0, n1 and the outcome's SD
    implied by the unadjusted standard error, sd = se_unadj / sqrt(1/n0 + 1/n1), the effect
    is (z_{1-alpha/2} + z_power) * se_unadj (so the unadjusted design is about this trial),
    ratio = n1 / n0, and r2 is the efficiency gain: the prognostic r2 for a continuous
    endpoint, variance_reduction clipped to [0, 0.99] otherwise. It sits a little below r2
    because the adjusted t test spends one degree of freedom on the score.
    """
    from scipy.stats import norm

    if isinstance(power, bool) or not (isinstance(power, numbers.Real) and 0 < power < 1):
        raise EffectInputError(f"power={power!r}: the target power must be in (0, 1), e.g. 0.8")
    _check_alpha(alpha)
    a = _arm(arm)
    s = _vector("score", score, len(a))
    out = _outcome(endpoint, len(a), y, time, event)
    unadj = estimate_effect(endpoint, arm=a, adjust=None, alpha=alpha, **out)
    adj = estimate_effect(endpoint, arm=a, adjust=s, alpha=alpha, **out)
    prognostic = _prognostic(endpoint, a, s, out)
    variance_reduction = 1 - adj.se**2 / unadj.se**2
    gain = prognostic["value"] if endpoint == "continuous" else variance_reduction
    n1, n0 = int(a.sum()), int(len(a) - a.sum())
    sd = unadj.se / math.sqrt(1 / n0 + 1 / n1)
    sizes = compare(effect=(norm.isf(alpha / 2) + norm.ppf(power)) * unadj.se, sd=sd,
                    r2=float(np.clip(gain, 0.0, MAX_GAIN)), power=power, alpha=alpha, ratio=n1 / n0)
    arms = {}
    for level, n_arm in (("0", n0), ("1", n1)):
        arms[level] = {"n": n_arm}
        if endpoint != "continuous":
            hits = out["y"] if endpoint == "binary" else out["event"]
            arms[level]["events"] = int(hits[a == float(level)].sum())
    return {"endpoint": endpoint, "unadjusted": unadj.to_dict(), "adjusted": adj.to_dict(),
            "prognostic": prognostic, "variance_reduction": float(variance_reduction),
            "sample_size_reduction": float(sizes["sample_size_reduction"]), "arms": arms}
