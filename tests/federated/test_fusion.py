import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from evoclone.federated.features import FeatureSpec
from evoclone.federated.models.bilstm import BiLSTM
from evoclone.federated.models.fusion import (FusionConfig, FusionPredictor, discrete_hazard_nll, endpoint_loss,
                                              risk_score, survival_curve)
from evoclone.federated.training import (DPSettings, TrainConfig, build_model, fusion_loss, predict_risk, to_dataset,
                                         train)

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
    per = endpoint_loss(cfg, logits, t, reduction="none")
    assert per.shape == (8,) and torch.allclose(per.mean(), loss)


def test_plain_training_learns_a_simple_signal():
    from evoclone.federated.metrics import c_index

    cfg = _cfg()
    a = _arrays(300, seed=1)
    model = build_model(cfg, seed=0)
    before = c_index(a["time"], a["event"], predict_risk(model, a))
    result = train(model, a, TrainConfig(epochs=8, batch_size=32, lr=3e-3))
    after = c_index(a["time"], a["event"], predict_risk(model, a))
    assert after > 0.7 and after > before
    assert result.history == [] and result.steps == 8 * 10


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_training_updates_weights_and_keeps_the_architecture(mode):
    cfg = _cfg()
    a = _arrays(64)
    model = build_model(cfg, seed=0).eval()  # e.g. right after validating the incoming global model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
    result = train(model, a, TrainConfig(epochs=1, batch_size=16), dp=dp)
    assert type(model.lstm) is BiLSTM  # one module with and without DP
    assert set(model.state_dict()) == set(before)
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.steps == 4 and result.sample_rate == pytest.approx(0.25) and result.examples == 64
    assert result.history == [(1.0, pytest.approx(0.25), 4)]


def test_bilstm_matches_a_packed_torch_lstm_and_keeps_its_parameter_names():
    torch.manual_seed(0)
    lstm = BiLSTM(6, 4)
    ref = torch.nn.LSTM(6, 4, batch_first=True, bidirectional=True)
    ref.load_state_dict(lstm.state_dict())  # same names: model directories saved with nn.LSTM still load
    x, lengths = torch.randn(5, 7, 6), torch.tensor([1, 7, 3, 5, 2])
    out = lstm(x, lengths)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    expected, _ = pad_packed_sequence(ref(packed)[0], batch_first=True, total_length=7)
    valid = (torch.arange(7)[None, :] < lengths[:, None])[..., None]
    torch.testing.assert_close(out * valid, expected * valid, atol=1e-6, rtol=1e-5)
    # inside the predictor too, each weight is saved once, under nn.LSTM's name
    state = FusionPredictor(_cfg()).state_dict()
    assert sorted(k for k in state if k.startswith("lstm.")) == sorted(f"lstm.{k}" for k in ref.state_dict())


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_per_sample_gradients_belong_to_their_own_patient(reduction):
    # DP-SGD clips each patient's gradient: Opacus's per-sample gradients of every layer
    # (the LSTM included) must equal the gradient of that patient's loss alone
    from opacus import GradSampleModule

    cfg = _cfg()
    a = _arrays(5, seed=3)
    a["lengths"] = np.array([2, 16, 1, 9, 4])  # unsorted lengths: packing would reorder the batch
    model = build_model(cfg, seed=0)
    batch = list(to_dataset(a).tensors)
    loss_fn = fusion_loss(cfg)
    gsm = GradSampleModule(model, loss_reduction=reduction)
    per_patient = loss_fn(gsm, batch, reduction="none")
    (per_patient.sum() if reduction == "sum" else per_patient.mean()).backward()
    per_sample = {n: p.grad_sample.clone() for n, p in gsm._module.named_parameters()}
    gsm._close()
    for i in range(5):
        model.zero_grad()
        loss_fn(model, [t[i:i + 1] for t in batch]).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(per_sample[n][i], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_ghost_clipping_and_hooks_take_the_same_private_step():
    # same batches, (negligible) noise: the two per-sample routes must clip identically; hooks
    # mode draws its noise as one flat vector, so equal noise *realizations* are not expected
    a = _arrays(64)
    states = []
    for mode in ("hooks", "ghost"):
        model = build_model(_cfg(), seed=0)
        # a small clipping bound, so that clipping is active for every patient
        train(model, a, TrainConfig(epochs=1, batch_size=16),
              dp=DPSettings(noise_multiplier=1e-9, max_grad_norm=0.05, grad_sample_mode=mode))
        states.append(model.state_dict())
    for k in states[0]:
        # AdamW turns float rounding in near-zero gradients into O(1e-5) steps
        torch.testing.assert_close(states[0][k], states[1][k], atol=2e-5, rtol=1e-4, msg=k)
    with pytest.raises(ValueError, match="hooks' or 'ghost'"):
        train(build_model(_cfg()), a, TrainConfig(), dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0,
                                                                   grad_sample_mode="functorch"))


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
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    result = train(model, a, TrainConfig(epochs=20, batch_size=1, seed=4), dp=dp)
    assert result.steps == 60
