"""Sample size with and without a prognostic score, against statsmodels' t-test power."""

from __future__ import annotations

import math

import pytest
from statsmodels.stats.power import TTestIndPower

from evoclone.federated.sample_size import METHOD, SampleSize, compare, curve, power, sample_size


@pytest.mark.parametrize("effect, sd, alpha, target, ratio", [
    (0.5, 1.0, 0.05, 0.8, 1.0), (3.0, 10.0, 0.05, 0.9, 2.0), (-0.2, 1.0, 0.01, 0.8, 0.5),
    (1.0, 1.0, 0.05, 0.8, 1.0), (0.35, 1.5, 0.1, 0.85, 3.0)])
def test_unadjusted_size_matches_statsmodels_rounded_up_per_arm(effect, sd, alpha, target, ratio):
    # statsmodels' ratio is nobs2 / nobs1: with nobs1 the control arm it is n_treatment / n_control, ours.
    nobs1 = TTestIndPower().solve_power(effect_size=abs(effect) / sd, power=target, alpha=alpha, ratio=ratio)
    got = sample_size(effect=effect, sd=sd, power=target, alpha=alpha, ratio=ratio)
    assert (got.n_control, got.n_treatment) == (math.ceil(nobs1), math.ceil(nobs1 * ratio))
    assert got.n_total == got.n_control + got.n_treatment
    assert got.power >= target
    ref = TTestIndPower().power(effect_size=abs(effect) / sd, nobs1=got.n_control, alpha=alpha,
                                ratio=got.n_treatment / got.n_control)
    assert got.power == pytest.approx(ref, abs=1e-10)


def test_power_matches_statsmodels_and_is_symmetric_in_sign():
    ref = TTestIndPower().power(effect_size=0.4, nobs1=50, alpha=0.05, ratio=1.4)
    assert power(n_treatment=70, n_control=50, effect=0.4) == pytest.approx(ref, abs=1e-12)
    assert power(n_treatment=70, n_control=50, effect=-0.4) == pytest.approx(ref, abs=1e-12)


def test_power_is_monotone():
    by_n = [power(n_treatment=n, n_control=n, effect=0.3, r2=0.3) for n in range(5, 400, 15)]
    by_effect = [power(n_treatment=60, n_control=60, effect=e) for e in (0.05, 0.1, 0.2, 0.4, 0.8)]
    by_r2 = [power(n_treatment=60, n_control=60, effect=0.3, r2=r) for r in (0.1, 0.3, 0.5, 0.7, 0.9)]
    for seq in (by_n, by_effect, by_r2):
        assert all(b > a for a, b in zip(seq, seq[1:]))
    assert power(n_treatment=60, n_control=60, effect=0.3, alpha=0.01) < power(n_treatment=60, n_control=60,
                                                                                 effect=0.3, alpha=0.05)


def test_adjustment_spends_one_degree_of_freedom():
    kwargs = dict(n_treatment=10, n_control=10, effect=1.0)
    assert power(**kwargs, r2=0.3) == power(**kwargs, r2=0.3, covariates=1)
    assert power(**kwargs, covariates=1) < power(**kwargs)


@pytest.mark.parametrize("r2", [0.1, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("ratio", [1.0, 2.0])
def test_adjusted_size_is_about_unadjusted_times_one_minus_r2(r2, ratio):
    unadj = sample_size(effect=0.25, r2=0.0, ratio=ratio)
    adj = sample_size(effect=0.25, r2=r2, ratio=ratio)
    assert abs(adj.n_total - unadj.n_total * (1 - r2)) <= 4
    assert adj.power >= 0.8


def test_size_is_minimal():
    got = sample_size(effect=0.4, r2=0.2)
    assert power(n_treatment=got.n_treatment - 1, n_control=got.n_control - 1, effect=0.4, r2=0.2) < 0.8


def test_compare_reports_both_designs_and_the_saving():
    out = compare(effect=0.3, r2=0.4)
    assert out["unadjusted"] == sample_size(effect=0.3).to_dict()
    assert out["adjusted"] == sample_size(effect=0.3, r2=0.4).to_dict()
    assert out["sample_size_reduction"] == 1 - out["adjusted"]["n_total"] / out["unadjusted"]["n_total"]
    # The score's extra degree of freedom keeps the saving just under r2.
    assert 0.37 < out["sample_size_reduction"] < 0.4
    assert out["r2"] == 0.4 and out["method"] == METHOD


def test_curve_falls_with_r2():
    points = curve(effect=0.3)
    assert [p["r2"] for p in points] == pytest.approx([i / 10 for i in range(10)])
    sizes = [p["n_total"] for p in points]
    assert sizes[0] == sample_size(effect=0.3).n_total
    assert all(b < a for a, b in zip(sizes, sizes[1:]))
    assert [p["r2"] for p in curve(effect=0.3, r2_grid=[0.0, 0.5])] == [0.0, 0.5]


def test_to_dict_is_plain():
    d = SampleSize(n_total=10, n_treatment=5, n_control=5, power=0.81).to_dict()
    assert d == {"n_total": 10, "n_treatment": 5, "n_control": 5, "power": 0.81}
    assert type(d["power"]) is float and type(d["n_total"]) is int


def test_large_effect_needs_the_smallest_design():
    got = sample_size(effect=50.0)
    assert got.n_total == 4 and got.power > 0.99


@pytest.mark.parametrize("kwargs, match", [
    (dict(effect=0.0), "effect=0.0"), (dict(effect=math.nan), "effect=nan"), (dict(effect=math.inf), "effect=inf"),
    (dict(effect=0.5, sd=0.0), "sd=0.0"), (dict(effect=0.5, sd=-1.0), "sd=-1.0"),
    (dict(effect=0.5, r2=-0.1), "r2=-0.1"), (dict(effect=0.5, r2=1.0), r"r2=1.0.*\[0, 1\)"),
    (dict(effect=0.5, power=0.0), "power=0.0"), (dict(effect=0.5, power=1.0), "power=1.0"),
    (dict(effect=0.5, alpha=0.0), "alpha=0.0"), (dict(effect=0.5, alpha=1.0), "alpha=1.0"),
    (dict(effect=0.5, ratio=0.0), "ratio=0.0"), (dict(effect=0.5, ratio=-2.0), "ratio=-2.0")])
def test_sample_size_rejects_bad_design(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        sample_size(**kwargs)
    assert "\n" not in str(info.value)
    if "power" not in kwargs and "ratio" not in kwargs:
        with pytest.raises(ValueError, match=match):
            power(n_treatment=20, n_control=20, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_treatment=0, n_control=10), "at least one patient per arm"),
    (dict(n_treatment=1, n_control=1), "residual degrees of freedom"),
    (dict(n_treatment=2, n_control=1, r2=0.5), "residual degrees of freedom"),
    (dict(n_treatment=10, n_control=10, covariates=-1), "covariates=-1")])
def test_power_rejects_impossible_designs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        power(effect=0.5, **kwargs)
