"""In-silico trial engine: twins from the ensemble's predictive distributions, the weighted Cox fit, bootstrap."""

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter

from evoclone.federated.insilico import cox_log_hr, predictor_twins, trial_effect


def _survival(n, seed, log_hr=-0.5, ties=True):
    rng = np.random.default_rng(seed)
    arm = rng.integers(0, 2, n)
    t = rng.exponential(10 / np.exp(log_hr * arm))
    c = rng.exponential(15, n)
    if ties:
        t, c = np.ceil(t), np.ceil(c)
    return np.minimum(t, c), (t <= c).astype(float), arm


@pytest.mark.parametrize("ties", [True, False])
def test_weighted_cox_equals_lifelines_on_replicated_rows(ties):
    time, event, arm = _survival(300, 1, ties=ties)
    w = np.random.default_rng(2).integers(0, 4, len(time))
    beta, se = cox_log_hr(time, event, arm, w)
    rep = np.repeat(np.arange(len(time)), w)
    ref = CoxPHFitter().fit(pd.DataFrame({"t": time[rep], "e": event[rep], "arm": arm[rep]}), "t", "e")
    assert beta == pytest.approx(ref.params_["arm"], abs=1e-6)
    assert se == pytest.approx(ref.standard_errors_["arm"], abs=1e-6)


def test_cox_without_events_in_an_arm_is_undefined_not_a_number_made_up():
    time, event, arm = _survival(100, 3)
    event[arm == 1] = 0
    assert np.isnan(cox_log_hr(time, event, arm)[0])
    with pytest.raises(ValueError, match="non-negative integers"):
        cox_log_hr(time, event, arm, np.full(len(time), 0.5))


def test_predictor_twins_follow_each_members_distribution():
    members, patients, n = 4, 50, 40
    # discrete hazards of 0.1 in each of 5 bins: P(event by horizon) = 1 - 0.9^5
    hazard_logit = np.full((members, patients, 5), np.log(0.1 / 0.9))
    tt = predictor_twins({0: hazard_logit, 1: hazard_logit - 1.0}, endpoint="time_to_event", n=n, horizon=500.0,
                         residual_sd=0.0, seed=0)
    assert len(tt.patient) == 2 * patients * n and tt.members == members
    assert np.bincount(tt.member).tolist() == [2 * patients * n // members] * members  # members take turns
    control = tt.arm == 0
    assert tt.event[control].mean() == pytest.approx(1 - 0.9 ** 5, abs=0.02)
    assert tt.event[~control].mean() < tt.event[control].mean() - 0.1
    assert tt.time.max() <= 500.0 and np.all(tt.time[tt.event == 0] == 500.0)
    logit = np.zeros((2, patients, 1))
    logit[1] = 2.0  # the second member is far more pessimistic
    b = predictor_twins({0: logit, 1: logit}, endpoint="binary", n=n, horizon=1, residual_sd=0, seed=1)
    assert b.y[b.member == 0].mean() == pytest.approx(0.5, abs=0.03)
    assert b.y[b.member == 1].mean() == pytest.approx(1 / (1 + np.exp(-2)), abs=0.03)
    c = predictor_twins({0: np.full((1, patients, 1), 3.0), 1: np.full((1, patients, 1), 5.0)}, endpoint="continuous",
                        n=n, horizon=1, residual_sd=2.0, seed=2)
    assert c.y[c.arm == 1].mean() - c.y[c.arm == 0].mean() == pytest.approx(2.0, abs=0.2)
    assert c.y[c.arm == 0].std() == pytest.approx(2.0, abs=0.15)


def _binary_table(members_disagree: bool, patients=200, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(-1, 0.5, patients)
    members = 5
    shift = np.linspace(-0.8, 0.2, members) if members_disagree else np.full(members, -0.3)
    control = np.tile(base, (members, 1))[..., None]
    treated = control + shift[:, None, None]
    return predictor_twins({0: control, 1: treated}, endpoint="binary", n=20, horizon=1, residual_sd=0, seed=seed)


def test_interval_covers_model_uncertainty_by_resampling_members():
    agree = trial_effect(_binary_table(False), n_patients=200, bootstrap=200, seed=0)
    disagree = trial_effect(_binary_table(True), n_patients=200, bootstrap=200, seed=0)
    width = lambda d: d["effect"]["ci_high"] - d["effect"]["ci_low"]  # noqa: E731
    assert width(disagree) > 1.5 * width(agree)
    e = agree["effect"]
    assert e["measure"] == "risk_ratio" and e["ci_low"] < e["estimate"] < e["ci_high"] < 1
    d = agree["effect_difference"]
    assert d["measure"] == "risk_difference" and d["ci_high"] < 0
    assert agree["arms"]["0"]["n"] == agree["arms"]["1"]["n"] == 200 * 20


def test_hazard_ratio_of_twins_recovers_the_models_effect_and_subgroups():
    patients, members = 300, 3
    logits = np.full((members, patients, 8), np.log(0.08 / 0.92))
    # treatment halves the hazard in the first 150 patients and does nothing in the others
    treated = logits.copy()
    treated[:, :150] += np.log(0.5)
    tt = predictor_twins({0: logits, 1: treated}, endpoint="time_to_event", n=20, horizon=800.0, residual_sd=0,
                         seed=4)
    labels = np.array(["responder"] * 150 + ["non-responder"] * 140 + ["tiny"] * 10, dtype=object)
    labels[-3:] = None  # missing labels belong to no subgroup
    doc = trial_effect(tt, n_patients=patients, subgroups={"group": labels}, bootstrap=100, seed=1)
    by = {s["value"]: s for s in doc["subgroups"]}
    assert set(by) == {"responder", "non-responder", "tiny"}
    assert by["responder"]["ci_low"] < 0.55 < by["responder"]["ci_high"]
    assert by["non-responder"]["ci_low"] < 1.0 < by["non-responder"]["ci_high"]
    assert by["tiny"]["estimate"] is None and "fewer than 10 patients" in by["tiny"]["note"]
    assert by["responder"]["n"] == 150 and by["tiny"]["n"] == 7
    assert 0.55 < doc["effect"]["estimate"] < 1.0 and doc["bootstrap_failed"] == 0


def test_the_arm_effects_standard_error_widens_the_hazard_ratio_interval_on_the_log_scale():
    patients, members = 300, 3
    logits = np.full((members, patients, 8), np.log(0.08 / 0.92))
    tt = predictor_twins({0: logits, 1: logits + np.log(0.6)}, endpoint="time_to_event", n=10, horizon=800.0,
                         residual_sd=0, seed=2)
    plain = trial_effect(tt, n_patients=patients, bootstrap=400, seed=3)["effect"]
    wide = trial_effect(tt, n_patients=patients, bootstrap=400, seed=3, log_effect_se=0.3)["effect"]
    assert wide["estimate"] == plain["estimate"]  # the point estimate is the model's
    half = lambda e: (np.log(e["ci_high"]) - np.log(e["ci_low"])) / 2  # noqa: E731
    # independent errors add in variance: sqrt(plain^2 + 0.3^2) on the log scale (percentiles: 15%)
    assert half(wide) == pytest.approx(np.hypot(half(plain), 1.96 * 0.3), rel=0.15)
    assert half(wide) > 2 * half(plain)


def test_bad_parameters_are_refused():
    tt = _binary_table(False, patients=20)
    with pytest.raises(ValueError, match="bootstrap"):
        trial_effect(tt, n_patients=20, bootstrap=5)
    with pytest.raises(ValueError, match="alpha"):
        trial_effect(tt, n_patients=20, alpha=0.7)
    with pytest.raises(ValueError, match="at least 1"):
        predictor_twins({0: np.zeros((1, 3, 1))}, endpoint="binary", n=0, horizon=1, residual_sd=0, seed=0)
