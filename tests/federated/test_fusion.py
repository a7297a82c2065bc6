import numpy as np
import pytest
import torch

from evoclone.federated.features import FeatureSpec
from evoclone.federated.models.fusion import (FusionConfig, FusionPredictor, discrete_hazard_nll, risk_score,
                                              survival_curve)
from evoclone.federated.training import TrainConfig, build_model, predict_risk, train_dp, train_plain

SPEC = FeatureSpec()


def _cfg(**kw):
    return FusionConfig(static_dim=SPEC.static_dim, visit_dim=SPEC.visit_dim, d_model=16, **kw)


def _arrays(n=48, seed=0):
    rng = np.random.default_rng(seed)
    static = rng.normal(size=(n, SPEC.static_dim)).astype(np.float32)
    risk = static[:, 0]
    return {"static": static, "visits": rng.normal(size=(n, SPEC.max_visits, SPEC.visit_dim)).astype(np.float32),
            "lengths": rng.integers(1, SPEC.max_visits + 1, n).astype(np.int64),
            "time": np.clip(400 * np.exp(-risk) * rng.exponential(size=n), 1, 2000).astype(np.float32),
            "event": (rng.random(n) < 0.6).astype(np.float32), "binary": np.zeros(n, np.float32),
            "continuous": np.zeros(n, np.float32), "split": np.zeros(n, np.int64)}


def test_forward_shapes_and_padding_is_ignored():
    cfg = _cfg()
    model = FusionPredictor(cfg).eval()
    a = _arrays(4)
    s, v, l = (torch.from_numpy(a[k]) for k in ("static", "visits", "lengths"))
    l = torch.tensor([1, 3, 16, 5])
    logits, loss = model(s, v, l)
    assert logits.shape == (4, cfg.time_bins) and loss is None
    v2 = v.clone()
    v2[0, 1:] = 99.0  # garbage after the first visit of patient 0 must not matter
    torch.testing.assert_close(model(s, v2, l)[0], logits)
    _, weights = model.encode(s, v, l)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))  # attention fusion weights are a distribution


def test_discrete_hazard_loss_is_per_patient():
    cfg = _cfg()
    logits = torch.randn(6, cfg.time_bins)
    time = torch.tensor([10.0, 200.0, 500.0, 1000.0, 2000.0, 140.0])
    event = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    full = discrete_hazard_nll(cfg, logits, time, event)
    for i in range(6):  # each patient's loss depends on that patient alone (DP-SGD's assumption)
        single = discrete_hazard_nll(cfg, logits[i:i + 1], time[i:i + 1], event[i:i + 1])
        torch.testing.assert_close(single[0], full[i])
    assert (full > 0).all()
    surv = survival_curve(cfg, logits)
    assert (surv[:, 1:] <= surv[:, :-1]).all() and risk_score(cfg, logits).shape == (6,)


@pytest.mark.parametrize("endpoint", ["binary", "continuous"])
def test_other_endpoint_heads(endpoint):
    cfg = _cfg(endpoint=endpoint)
    a = _arrays(8)
    model = FusionPredictor(cfg)
    t = {k: torch.from_numpy(a[k]) for k in ("time", "event", "binary", "continuous")}
    logits, loss = model(torch.from_numpy(a["static"]), torch.from_numpy(a["visits"]), torch.from_numpy(a["lengths"]), t)
    assert logits.shape == (8, 1) and torch.isfinite(loss)


def test_plain_training_learns_a_simple_signal():
    from evoclone.federated.metrics import c_index

    cfg = _cfg()
    a = _arrays(300, seed=1)
    model = build_model(cfg, seed=0)
    before = c_index(a["time"], a["event"], predict_risk(model, a))
    train_plain(model, a, TrainConfig(epochs=8, batch_size=32, lr=3e-3))
    after = c_index(a["time"], a["event"], predict_risk(model, a))
    assert after > 0.7 and after > before


def test_dp_training_updates_weights_and_keeps_the_architecture():
    cfg = _cfg()
    a = _arrays(64)
    model = build_model(cfg, seed=0).eval()  # e.g. right after validating the incoming global model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_dp(model, a, TrainConfig(epochs=1, batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0)
    assert isinstance(model.lstm, torch.nn.LSTM)  # DPLSTM is only used while training privately
    assert set(model.state_dict()) == set(before)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.steps == 4 and result.sample_rate == pytest.approx(0.25) and result.examples == 64


def test_bad_config_rejected():
    with pytest.raises(ValueError):
        _cfg(endpoint="survival")
    with pytest.raises(ValueError):
        FusionConfig(static_dim=3, visit_dim=3, d_model=15, n_heads=2)


def test_dp_training_counts_empty_poisson_batches():
    # 3 examples, sample rate 1/3: empty batches are frequent and must still be noisy steps
    cfg = _cfg()
    a = _arrays(3)
    model = build_model(cfg, seed=0)
    result = train_dp(model, a, TrainConfig(epochs=20, batch_size=1, seed=4), noise_multiplier=1.0, max_grad_norm=1.0)
    assert result.steps == 60
