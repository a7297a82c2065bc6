import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from evoclone.federated import trainer
from evoclone.federated.artifacts import load_component, save_component
from evoclone.federated.features import FeatureSpec
from evoclone.federated.metrics import c_index
from evoclone.federated.models.fusion import FusionConfig, discrete_hazard_nll
from evoclone.federated.predictor import (CATEGORIES, RISK_THRESHOLDS, FusionEnsemble, ensemble_dp, ensemble_history,
                                          feature_groups, top_features, train_ensemble)
from evoclone.federated.trainer import DPSettings, TrainConfig, TrainResult
from evoclone.federated.training import build_model, train
from evoclone.privacy.accounting import epsilon_of

SPEC = FeatureSpec(lab_trends=False)  # only sets the synthetic arrays' widths (their draws are seeded)
TCFG = TrainConfig(epochs=5, batch_size=32, lr=1e-2)


def _cfg(endpoint="time_to_event"):
    return FusionConfig(static_dim=SPEC.static_dim, visit_dim=SPEC.visit_dim, d_model=8, endpoint=endpoint)


def _arrays(n, seed):
    rng = np.random.default_rng(seed)
    static = rng.normal(size=(n, SPEC.static_dim)).astype(np.float32)
    risk = static[:, 0] - 0.5 * static[:, 1]
    return {"static": static, "visits": rng.normal(size=(n, SPEC.max_visits, SPEC.visit_dim)).astype(np.float32),
            "lengths": rng.integers(1, SPEC.max_visits + 1, n).astype(np.int64),
            "time": np.clip(400 * np.exp(-risk) * rng.exponential(size=n), 1, 2000).astype(np.float32),
            "event": (rng.random(n) < 0.7).astype(np.float32),
            "binary": (rng.random(n) < 1 / (1 + np.exp(-2 * risk))).astype(np.float32),
            "continuous": (2 * risk + rng.normal(size=n)).astype(np.float32)}


TRAIN, VAL = _arrays(200, 0), _arrays(100, 1)
_TRAINED: dict[str, FusionEnsemble] = {}


def _ensemble(endpoint: str) -> FusionEnsemble:
    if endpoint not in _TRAINED:  # trained once per endpoint, shared by the tests that only read it
        _TRAINED[endpoint], _ = train_ensemble(_cfg(endpoint), TRAIN, VAL, TCFG, members=5)
    return _TRAINED[endpoint]


@pytest.mark.parametrize("endpoint", ["time_to_event", "continuous"])
def test_interval_widens_out_of_distribution(endpoint):
    ens = _ensemble(endpoint)
    inside = ens.predict(VAL)
    ood = {**VAL, "static": np.full_like(VAL["static"], 6.0)}  # every covariate at +6 sd
    outside = ens.predict(ood)
    width_in = np.median(inside["ci_high"] - inside["ci_low"])
    width_out = np.median(outside["ci_high"] - outside["ci_low"])
    assert width_out > 1.5 * width_in
    for p in (inside, outside):
        assert (p["ci_low"] <= p["risk"]).all() and (p["risk"] <= p["ci_high"]).all()
        assert set(p["category"]) <= set(CATEGORIES) and len(p["risk"]) == len(VAL["static"])


@pytest.mark.parametrize("endpoint", ["time_to_event", "binary", "continuous"])
def test_integrated_gradients_are_complete_and_grouped(endpoint):
    ens = _ensemble(endpoint)
    groups = feature_groups(SPEC)
    rows = {k: v[:6].copy() for k, v in VAL.items()}
    age = groups.names.index("age")
    rows["static"][0, [i for i, g in enumerate(groups.static) if g == age]] = 0.0  # age at the baseline
    attr = ens.explain(rows, groups)
    assert attr.shape == (6, len(groups.names))
    baseline = {**rows, "static": np.zeros_like(rows["static"]), "visits": np.zeros_like(rows["visits"])}
    diff = ens.predict(rows)["risk"] - ens.predict(baseline)["risk"]
    assert np.all(np.abs(attr.sum(axis=1) - diff) <= 0.02 * np.abs(diff) + 1e-3)
    assert attr[0, age] == 0.0  # a feature at its baseline value gets no credit
    top = top_features(attr, groups.names, k=3)
    assert len(top) == 6 and all(len(t) == 3 and len(set(t)) == 3 for t in top)
    assert top[1][0] == groups.names[int(np.argmax(np.abs(attr[1])))]


def test_feature_groups_follow_the_encoding():
    g = feature_groups(SPEC)
    assert len(g.static) == SPEC.static_dim and len(g.visit) == SPEC.visit_dim
    assert len(set(g.names)) == len(g.names)
    sex = g.names.index("sex")
    assert [i for i, x in enumerate(g.static) if x == sex] == [6, 7]  # one-hot F, M -> one feature
    assert g.static[11] == g.names.index("arm")
    ldl = g.names.index("ldl")
    assert [i for i, x in enumerate(g.static) if x == ldl] == [12, 13]  # baseline value and its presence
    assert [i for i, x in enumerate(g.visit) if x == ldl] == [2, 3]
    assert g.visit[:2] == (g.names.index("visit_timing"),) * 2


def _val_nll(ens: FusionEnsemble, endpoint: str) -> float:
    t = {k: torch.as_tensor(VAL[k]) for k in ("time", "event", "binary")}
    with torch.no_grad():
        logits = ens._logits(*(torch.as_tensor(VAL[k]) for k in ("static", "visits", "lengths")))[0]
    if endpoint == "time_to_event":
        return float(discrete_hazard_nll(ens.cfg, logits, t["time"], t["event"]).mean())
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), t["binary"]))


@pytest.mark.parametrize("endpoint", ["time_to_event", "binary"])
def test_calibration_reduces_validation_nll_of_a_miscalibrated_model(endpoint):
    model = build_model(_cfg(endpoint), seed=0)
    train(model, TRAIN, TCFG)
    with torch.no_grad():
        model.head.weight.mul_(3.0)  # overconfident ...
        model.head.bias.add_(1.5)  # ... and biased towards the event
    ens = FusionEnsemble(model.cfg, [model])
    before = _val_nll(ens, endpoint)
    ens.calibrate(VAL)
    after = _val_nll(ens, endpoint)
    assert after < before - 0.05
    (scale, shift), = ens.calibration
    assert scale < 1.0 and shift < 0.0


def test_categories_use_the_documented_thresholds():
    ens = FusionEnsemble(_cfg(), [build_model(_cfg())])
    assert RISK_THRESHOLDS == (0.10, 0.20)
    cats = ens.categorize(np.array([0.0, 0.0999, 0.10, 0.1999, 0.20, 0.9]))
    assert cats.tolist() == ["low", "low", "moderate", "moderate", "high", "high"]
    cont = _ensemble("continuous")
    low, high = cont.tertiles
    assert low < high
    assert cont.categorize(np.array([low - 1, (low + high) / 2, high + 1])).tolist() == list(CATEGORIES)
    assert sorted(np.unique(cont.predict(VAL)["category"])) == sorted(CATEGORIES)


def test_binary_and_continuous_heads_learn():
    binary = _ensemble("binary").predict(VAL)["risk"]
    assert ((0 <= binary) & (binary <= 1)).all()
    # C-index with every patient "event at time 1 - y" is the AUROC of the binary endpoint
    assert c_index(1.0 - VAL["binary"], np.ones(len(binary)), binary) > 0.65  # oracle: 0.78
    cont = _ensemble("continuous").predict(VAL)["risk"]
    assert np.corrcoef(cont, VAL["continuous"])[0, 1] > 0.6  # oracle: 0.87
    tte = _ensemble("time_to_event").predict(VAL)["risk"]
    assert c_index(VAL["time"], VAL["event"], tte) > 0.65  # oracle: 0.76


def test_dp_ensemble_epsilon_matches_the_opacus_accountant():
    tr, va = _arrays(64, 2), _arrays(20, 3)
    tcfg = TrainConfig(epochs=2, batch_size=16, lr=1e-2)
    dp = ensemble_dp(len(tr["static"]), tcfg, members=3, target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
    ens, results = train_ensemble(_cfg(), tr, va, tcfg, members=3, dp=dp)
    history = ensemble_history(results)
    assert len(history) == 3 * 2 and sum(s for _, _, s in history) == 3 * 2 * 4  # one entry per member epoch
    direct = RDPAccountant()
    for r in results:
        for _ in range(r.steps):
            direct.step(noise_multiplier=r.noise_multiplier, sample_rate=r.sample_rate)
    eps = epsilon_of(history, delta=1e-5)
    assert eps == pytest.approx(direct.get_epsilon(delta=1e-5), rel=1e-9)
    assert 2.9 < eps <= 3.0 + 1e-9  # the noise was calibrated for all members' steps together
    one_member = epsilon_of(history[:2], delta=1e-5)
    assert one_member < eps  # charging a single member would under-count
    assert ens.members == 3 and np.isfinite(ens.predict(va)["risk"]).all()


def test_dp_and_plain_training_share_trainer_fit(monkeypatch):
    calls = []
    real_fit = trainer.fit

    def spy(model, dataset, cfg, *, loss_fn, dp=None, on_step=None):
        calls.append(dp)
        return real_fit(model, dataset, cfg, loss_fn=loss_fn, dp=dp, on_step=on_step)

    monkeypatch.setattr(trainer, "fit", spy)
    tr = _arrays(48, 4)
    tcfg = TrainConfig(epochs=1, batch_size=16)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    for setting in (None, dp):
        model = build_model(_cfg(), seed=0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        result = train(model, tr, tcfg, dp=setting)
        assert isinstance(result, TrainResult) and result.steps == 3
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert result.history == ([] if setting is None else [(1.0, pytest.approx(1 / 3), 3)])
    assert calls == [None, dp]


def test_ensemble_round_trips_through_a_model_directory(tmp_path):
    ens = _ensemble("continuous")
    meta = ens.meta()
    save_component(tmp_path, "predictor", ens.state_tensors(), kind="fusion_ensemble", config=meta["config"],
                   vocabulary={"spec": "test"}, extra={"ensemble": json.loads(json.dumps(meta))})
    tensors, entry, _ = load_component(tmp_path, "predictor")
    loaded = FusionEnsemble.from_state(entry["ensemble"], tensors)
    a, b = ens.predict(VAL), loaded.predict(VAL)
    for k in ("risk", "ci_low", "ci_high"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
    assert (a["category"] == b["category"]).all() and loaded.tertiles == ens.tertiles
    assert loaded.calibration == ens.calibration and loaded.residual_sd == ens.residual_sd
    with pytest.raises(ValueError, match="member 5"):
        FusionEnsemble.from_state({**meta, "members": 6}, ens.state_tensors())


def test_bad_input_is_refused_with_the_rows():
    ens = _ensemble("time_to_event")
    bad = {k: v[:5].copy() for k, v in VAL.items()}
    bad["static"][3, 2] = np.nan
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        ens.predict(bad)
    with pytest.raises(ValueError, match="do not fit the model"):
        ens.predict({**bad, "static": bad["static"][:, :5]})
    with pytest.raises(ValueError, match="members"):
        train_ensemble(_cfg(), TRAIN, VAL, replace(TCFG, epochs=1), members=0)
