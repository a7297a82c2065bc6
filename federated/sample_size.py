"""Prospective sample size for a continuous endpoint, with and without a prognostic score.

Follows Schuler et al., "Increasing the efficiency of randomized trial estimates via linear
adjustment for a prognostic score", Int J Biostat 2022 (the PROCOVA method): with a share
pi1 = ratio / (1 + ratio) of patients on treatment and equal outcome variances, the ANCOVA
estimator adjusted for a score whose within-arm correlation with the outcome is rho has

    Var = sd^2 (1 - rho^2) (1/pi0 + 1/pi1) / n,

and the two-sided test's power comes from the noncentral t with noncentrality
effect / sqrt(Var) and df = n - 2 - covariates (one covariate: the score). `ratio` is
n_treatment / n_control throughout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, special, stats

METHOD = "Schuler et al., Int J Biostat 2022: ANCOVA with a prognostic score, noncentral t"
# Past this a trial is not worth sizing: the effect is too small for the standard deviation.
MAX_TOTAL = 10**9


@dataclass(frozen=True)
class SampleSize:
    """Patients needed per arm and in total, and the power those arms reach."""

    n_total: int
    n_treatment: int
    n_control: int
    power: float

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of all fields."""
        return {"n_total": int(self.n_total), "n_treatment": int(self.n_treatment),
                "n_control": int(self.n_control), "power": float(self.power)}


def _check(*, effect: float, sd: float, r2: float, alpha: float, power: float | None = None,
           ratio: float | None = None) -> None:
    """Raise ValueError, one line, for the first design parameter out of range."""
    if not (math.isfinite(effect) and effect != 0):
        raise ValueError(f"effect={effect!r}: the effect to detect must be a finite non-zero number "
                         "(outcome units, or SD units with sd=1)")
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"sd={sd!r}: the outcome standard deviation must be a finite number > 0")
    if not (0 <= r2 < 1):
        raise ValueError(f"r2={r2!r}: the score's within-arm R^2 must be in [0, 1); "
                         "use 0 for no prognostic adjustment")
    if not (0 < alpha < 1):
        raise ValueError(f"alpha={alpha!r}: the two-sided significance level must be in (0, 1), e.g. 0.05")
    if power is not None and not (0 < power < 1):
        raise ValueError(f"power={power!r}: the target power must be in (0, 1), e.g. 0.8")
    if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"ratio={ratio!r}: the allocation ratio n_treatment/n_control must be > 0, e.g. 1 or 2")


def _power(n_t: float, n_c: float, *, effect: float, sd: float, r2: float, alpha: float, covariates: int) -> float:
    """Two-sided noncentral-t power for (possibly fractional) arm sizes; no validation."""
    df = n_t + n_c - 2 - covariates
    se = sd * math.sqrt((1 - r2) * (1 / n_t + 1 / n_c))
    nc = abs(effect) / se  # the two-sided test is symmetric, and scipy's nct is safest with nc >= 0
    # scipy.special directly: the stats.nct wrappers cost ~10x more, and procova solves per trial.
    crit = special.stdtrit(df, 1 - alpha / 2)
    # nctdtr returns NaN deep in the far tail (large nc), where the true value is ~0.
    wrong_side = float(np.nan_to_num(special.nctdtr(df, nc, -crit), nan=0.0))
    return float(1 - special.nctdtr(df, nc, crit)) + wrong_side


def power(*, n_treatment: int, n_control: int, effect: float, sd: float = 1.0, r2: float = 0.0,
          alpha: float = 0.05, covariates: int | None = None) -> float:
    """Power of the two-sided ANCOVA t-test for the given arms (covariates: 1 if r2 > 0 else 0)."""
    _check(effect=effect, sd=sd, r2=r2, alpha=alpha)
    k = (1 if r2 > 0 else 0) if covariates is None else covariates
    if k < 0 or int(k) != k:
        raise ValueError(f"covariates={covariates!r}: the number of adjustment covariates must be an integer >= 0")
    if min(n_treatment, n_control) < 1 or n_treatment + n_control - 2 - k < 1:
        raise ValueError(f"n_treatment={n_treatment}, n_control={n_control}: need at least one patient per arm "
                         f"and more than {2 + k} in total to leave residual degrees of freedom")
    return _power(float(n_treatment), float(n_control), effect=effect, sd=sd, r2=r2, alpha=alpha, covariates=int(k))


def sample_size(*, effect: float, sd: float = 1.0, r2: float = 0.0, power: float = 0.8, alpha: float = 0.05,
                ratio: float = 1.0) -> SampleSize:
    """Smallest trial (arms rounded up at the allocation ratio) whose test reaches `power`.

    The total n is solved on the real line (arms n*pi1 and n*pi0), then each arm is
    rounded up, as statsmodels' TTestIndPower users do for r2 = 0.
    """
    target = power
    _check(effect=effect, sd=sd, r2=r2, alpha=alpha, power=target, ratio=ratio)
    k = 1 if r2 > 0 else 0
    pi1 = ratio / (1 + ratio)
    pi0 = 1 - pi1

    def gap(n: float) -> float:
        return _power(n * pi1, n * pi0, effect=effect, sd=sd, r2=r2, alpha=alpha, covariates=k) - target

    # Smallest design with one residual df and a patient per arm; the t test can do no better.
    floor = max(3.0 + k, 1 / pi1, 1 / pi0) + 1e-9
    # The normal approximation is close from below (t tails are heavier), so bracket around it.
    z = stats.norm.isf(alpha / 2) + stats.norm.ppf(target)
    guess = max(floor, (z * sd / effect) ** 2 * (1 - r2) / (pi0 * pi1))
    if gap(guess) >= 0:
        lo, hi = floor, guess
    else:
        lo, hi = guess, 1.5 * guess + 10
        while gap(hi) < 0:
            if hi > MAX_TOTAL:
                raise ValueError(f"effect={effect!r} with sd={sd!r} needs more than {MAX_TOTAL} patients; "
                                 "check the effect's units")
            lo, hi = hi, 2 * hi
    n_star = lo if gap(lo) >= 0 else optimize.brentq(gap, lo, hi, xtol=1e-9, rtol=1e-12)
    # A hair's tolerance stops 31.999999999 patients from becoming 33 after floating-point noise.
    n_t = max(1, math.ceil(n_star * pi1 - 1e-7))
    n_c = max(1, math.ceil(n_star * pi0 - 1e-7))
    achieved = _power(float(n_t), float(n_c), effect=effect, sd=sd, r2=r2, alpha=alpha, covariates=k)
    while achieved < target:  # only if the tolerance above rounded a real shortfall away
        n_t, n_c = (n_t + 1, n_c) if n_t / n_c < ratio else (n_t, n_c + 1)
        achieved = _power(float(n_t), float(n_c), effect=effect, sd=sd, r2=r2, alpha=alpha, covariates=k)
    return SampleSize(n_total=n_t + n_c, n_treatment=n_t, n_control=n_c, power=achieved)


def compare(*, effect: float, sd: float = 1.0, r2: float, power: float = 0.8, alpha: float = 0.05,
            ratio: float = 1.0) -> dict:
    """Unadjusted against score-adjusted sample size, and the relative saving."""
    unadj = sample_size(effect=effect, sd=sd, r2=0.0, power=power, alpha=alpha, ratio=ratio)
    adj = sample_size(effect=effect, sd=sd, r2=r2, power=power, alpha=alpha, ratio=ratio)
    return {"unadjusted": unadj.to_dict(), "adjusted": adj.to_dict(), "r2": float(r2),
            "sample_size_reduction": 1 - adj.n_total / unadj.n_total, "method": METHOD}


def curve(*, effect: float, sd: float = 1.0, power: float = 0.8, alpha: float = 0.05, ratio: float = 1.0,
          r2_grid=None) -> list[dict]:
    """Total sample size against the score's R^2 (default grid 0, 0.1, ..., 0.9) for plotting."""
    grid = np.round(np.arange(10) / 10, 2) if r2_grid is None else np.asarray(r2_grid, dtype=float).ravel()
    return [{"r2": float(r2), "n_total": sample_size(effect=effect, sd=sd, r2=float(r2), power=power,
                                                      alpha=alpha, ratio=ratio).n_total} for r2 in grid]
