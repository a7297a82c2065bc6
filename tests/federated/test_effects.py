"""Treatment effects and PROCOVA against independent statsmodels / lifelines fits."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index
from scipy import stats

from evoclone.federated.effects import (ENDPOINTS, MIN_EVENTS, EffectEstimate, EffectInputError, estimate_effect,
                                        procova)


def trial(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """A randomized trial with a prognostic score and all three kinds of outcome."""
    rng = np.random.default_rng(seed)
    arm = rng.permutation(np.arange(n) % 2)
    score = rng.normal(size=n)
    other = rng.normal(size=n)
    lin = -0.3 + 0.5 * arm + 1.2 * score + 0.3 * other
    t_event = rng.exponential(size=n) * np.exp(-(0.4 * arm + 0.9 * score))
    t_cens = rng.uniform(0.2, 3.0, size=n)
    return pd.DataFrame({
        "arm": arm, "score": score, "other": other,
        "y": 2.0 + 0.6 * arm + 1.5 * score + 0.4 * other + rng.normal(size=n),
        "yb": (rng.random(n) < 1 / (1 + np.exp(-lin))).astype(float),
        "time": np.minimum(t_event, t_cens), "event": (t_event <= t_cens).astype(float)})


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return trial()


def assert_matches(got: EffectEstimate, estimate, se, low, high, p, n) -> None:
    assert (got.estimate, got.se, got.ci_low, got.ci_high, got.p_value) == pytest.approx(
        (estimate, se, low, high, p), rel=1e-6, abs=1e-12)
    assert got.n == n


@pytest.mark.parametrize("formula, adjust", [("y ~ arm", None), ("y ~ arm + score", ["score"]),
                                             ("y ~ arm + score + other", ["score", "other"])])
@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_continuous_is_statsmodels_ancova(df, formula, adjust, alpha):
    ref = smf.ols(formula, data=df).fit()
    got = estimate_effect("continuous", arm=df.arm, y=df.y, adjust=None if adjust is None else df[adjust].to_numpy(),
                          alpha=alpha)
    low, high = ref.conf_int(alpha).loc["arm"]
    assert got.measure == "mean_difference"
    assert_matches(got, ref.params["arm"], ref.bse["arm"], low, high, ref.pvalues["arm"], len(df))


def g_computation(df: pd.DataFrame, covariates: list[str], alpha: float):
    """Standardized risk difference from the Logit's parameters, delta method by numerical derivatives."""
    ref = smf.logit("yb ~ arm" + "".join(f" + {c}" for c in covariates), data=df).fit(disp=0)
    x1 = np.column_stack([np.ones(len(df)), np.ones(len(df))] + [df[c] for c in covariates])
    x0 = x1.copy()
    x0[:, 1] = 0.0

    def rd(beta):
        return np.mean(1 / (1 + np.exp(-x1 @ beta)) - 1 / (1 + np.exp(-x0 @ beta)))

    beta = ref.params.to_numpy()
    h = 1e-6
    grad = np.array([(rd(beta + h * e) - rd(beta - h * e)) / (2 * h) for e in np.eye(len(beta))])
    est, se = rd(beta), math.sqrt(grad @ ref.cov_params().to_numpy() @ grad)
    z = stats.norm.isf(alpha / 2)
    return est, se, est - z * se, est + z * se, 2 * stats.norm.sf(abs(est / se))


@pytest.mark.parametrize("covariates", [["score"], ["score", "other"]])
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_binary_is_standardized_logit_risk_difference(df, covariates, alpha):
    got = estimate_effect("binary", arm=df.arm, y=df.yb, adjust=df[covariates].to_numpy(), alpha=alpha)
    assert got.measure == "risk_difference"
    assert_matches(got, *g_computation(df, covariates, alpha), len(df))


def test_unadjusted_binary_is_the_difference_in_proportions(df):
    p1, p0 = df.yb[df.arm == 1].mean(), df.yb[df.arm == 0].mean()
    n1, n0 = (df.arm == 1).sum(), (df.arm == 0).sum()
    se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    got = estimate_effect("binary", arm=df.arm, y=df.yb)
    assert_matches(got, p1 - p0, se, p1 - p0 - 1.959963984540054 * se, p1 - p0 + 1.959963984540054 * se,
                   2 * stats.norm.sf(abs(p1 - p0) / se), len(df))


@pytest.mark.parametrize("covariates", [[], ["score"], ["score", "other"]])
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_time_to_event_is_lifelines_cox(df, covariates, alpha):
    ref = CoxPHFitter(alpha=alpha).fit(df[["time", "event", "arm"] + covariates], "time", "event").summary.loc["arm"]
    level = f"{round(100 * (1 - alpha))}%"
    got = estimate_effect("time_to_event", arm=df.arm, time=df.time, event=df.event,
                          adjust=df[covariates].to_numpy() if covariates else None, alpha=alpha)
    assert got.measure == "hazard_ratio"
    assert_matches(got, ref["exp(coef)"], ref["se(coef)"], ref[f"exp(coef) lower {level}"],
                   ref[f"exp(coef) upper {level}"], ref["p"], len(df))


def test_estimate_to_dict_is_plain(df):
    d = estimate_effect("continuous", arm=df.arm, y=df.y).to_dict()
    assert list(d) == ["measure", "estimate", "se", "ci_low", "ci_high", "p_value", "n"]
    assert all(type(d[k]) is float for k in ("estimate", "se", "ci_low", "ci_high", "p_value"))
    assert type(d["n"]) is int


def test_procova_continuous_gain_matches_within_arm_r2():
    rng = np.random.default_rng(7)
    n = 4000
    arm = rng.permutation(np.arange(n) % 2)
    score = rng.normal(size=n)
    y = 1.0 - 0.3 * arm + 1.0 * score + rng.normal(scale=0.8, size=n)  # within-arm r2 = 1 / 1.64
    out = procova("continuous", arm=arm, score=score, y=y)
    r2 = out["prognostic"]["value"]
    assert out["prognostic"]["metric"] == "r2"
    assert r2 == pytest.approx(1 / 1.64, abs=0.03)
    assert out["variance_reduction"] == pytest.approx(r2, abs=0.02)
    assert r2 - 0.02 < out["sample_size_reduction"] < r2
    assert out["adjusted"] == estimate_effect("continuous", arm=arm, y=y, adjust=score).to_dict()
    assert out["unadjusted"] == estimate_effect("continuous", arm=arm, y=y).to_dict()
    assert out["endpoint"] == "continuous"
    assert out["arms"] == {"0": {"n": n // 2}, "1": {"n": n // 2}}
    assert out["variance_reduction"] == 1 - out["adjusted"]["se"] ** 2 / out["unadjusted"]["se"] ** 2


def test_procova_binary_reports_auroc_and_events(df):
    out = procova("binary", arm=df.arm, score=df.score, y=df.yb)
    pos, neg = df.score[df.yb == 1].to_numpy(), df.score[df.yb == 0].to_numpy()
    auroc = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert out["prognostic"] == {"metric": "auroc", "value": pytest.approx(auroc, abs=1e-12)}
    assert out["arms"]["1"] == {"n": int((df.arm == 1).sum()), "events": int(df.yb[df.arm == 1].sum())}
    assert out["arms"]["0"]["events"] == int(df.yb[df.arm == 0].sum())
    assert out["variance_reduction"] > 0.1  # a strong score sharpens the standardized risk difference
    assert 0 < out["sample_size_reduction"] < out["variance_reduction"]


def test_procova_time_to_event_reports_c_index_and_events(df):
    out = procova("time_to_event", arm=df.arm, score=df.score, time=df.time, event=df.event)
    assert out["prognostic"] == {"metric": "c_index",
                                 "value": pytest.approx(concordance_index(df.time, -df.score, df.event), abs=1e-12)}
    assert out["prognostic"]["value"] > 0.6
    assert out["arms"]["0"] == {"n": int((df.arm == 0).sum()), "events": int(df.event[df.arm == 0].sum())}
    assert out["adjusted"]["measure"] == "hazard_ratio"
    assert 0 <= out["sample_size_reduction"] < 1


def test_endpoints_are_the_documented_three():
    assert ENDPOINTS == ("time_to_event", "binary", "continuous") and MIN_EVENTS == 10


def bad_cases():
    """(endpoint, keyword arguments, message fragment) for every input an effect refuses."""
    d = trial(n=120, seed=3)
    arm, y, yb, t, e, s = (d[c].to_numpy() for c in ("arm", "y", "yb", "time", "event", "score"))

    def put(x, i, v):
        x = np.array(x, dtype=float)
        x[i] = v
        return x

    few = np.zeros(len(arm))
    few[:MIN_EVENTS - 1] = 1
    return [
        ("survival", dict(arm=arm, y=y), "unknown endpoint 'survival'"),
        ("continuous", dict(arm=np.ones(len(y)), y=y), "arm holds only 1"),
        ("continuous", dict(arm=np.arange(len(y)) % 3, y=y), r"arm holds the values \{0, 1, 2\}"),
        ("continuous", dict(arm=arm * 2, y=y), "code it as 0 .control. and 1"),
        ("continuous", dict(arm=np.where(arm == 1, "drug", "placebo"), y=y), "arm must be numeric.*code labels"),
        ("continuous", dict(arm=arm, y=y[:-1]), "y has 119 values but arm has 120"),
        ("continuous", dict(arm=arm, y=y, adjust=s[:-2]), "adjust has 118 rows"),
        ("continuous", dict(arm=arm, y=put(y, 5, np.nan)), "y has 1 missing or infinite row.*first at row 5.*drop"),
        ("continuous", dict(arm=put(arm, 2, np.nan), y=y), "arm has 1 missing"),
        ("continuous", dict(arm=arm, y=y, adjust=np.column_stack([s, put(s, 7, np.inf)])),
         "adjust has 1 missing or infinite row.*row 7"),
        ("continuous", dict(arm=arm, y=np.full(len(y), 3.0)), "y is 3 in every patient"),
        ("continuous", dict(arm=arm), "needs the outcome y"),
        ("continuous", dict(arm=arm, y=y, adjust=np.ones(len(y))), "constant or collinear"),
        ("continuous", dict(arm=arm, y=y, alpha=0.0), "alpha=0.0"),
        ("continuous", dict(arm=arm, y=y, alpha=0.6), r"alpha=0.6.*\(0, 0.5\]"),
        ("binary", dict(arm=arm, y=put(yb, 0, 2.0)), "binary y must be 0 or 1"),
        ("binary", dict(arm=arm, y=np.zeros(len(yb))), "binary y is 0 in every patient"),
        ("binary", dict(arm=arm, y=few), f"only {MIN_EVENTS - 1} positives"),
        ("binary", dict(arm=arm, y=1 - few), f"only {MIN_EVENTS - 1} negatives"),
        ("binary", dict(arm=arm, y=(s > 0).astype(float), adjust=s), "did not converge, usually separation"),
        ("time_to_event", dict(arm=arm, time=t), "needs both time and event"),
        ("time_to_event", dict(arm=arm, time=put(t, 4, -1.0), event=e), "time has 1 negative value.*row 4"),
        ("time_to_event", dict(arm=arm, time=t, event=np.zeros(len(t))), "every patient is censored"),
        ("time_to_event", dict(arm=arm, time=t, event=few), f"only {MIN_EVENTS - 1} events"),
        ("time_to_event", dict(arm=arm, time=t, event=put(e, 0, 2.0)), "event must be 0 .censored. or 1"),
        ("time_to_event", dict(arm=arm, time=t, event=np.ones(len(t)), adjust=-t), "Cox model did not converge"),
    ]


@pytest.mark.parametrize("endpoint, kwargs, match", bad_cases())
def test_bad_input_raises_a_one_line_effect_input_error(endpoint, kwargs, match):
    with pytest.raises(EffectInputError, match=match) as info:
        estimate_effect(endpoint, **kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_procova_validates_score_and_power(df):
    kwargs = dict(arm=df.arm, y=df.y)
    with pytest.raises(EffectInputError, match="score has 1 missing"):
        procova("continuous", score=np.where(np.arange(len(df)) == 3, np.nan, df.score), **kwargs)
    with pytest.raises(EffectInputError, match="score must be one value per patient"):
        procova("continuous", score=df[["score", "other"]].to_numpy(), **kwargs)
    with pytest.raises(EffectInputError, match="power=1.0"):
        procova("continuous", score=df.score, power=1.0, **kwargs)
    with pytest.raises(EffectInputError, match="unknown endpoint"):
        procova("ordinal", score=df.score, **kwargs)
