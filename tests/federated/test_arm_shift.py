"""The arm's effect re-estimated on a trained ensemble (federated.arm_shift): the per-arm shifts equal a
statsmodels GLM with the network as offset, shift only the chosen arm's outputs, survive saving, and the
site's noised sums have the documented sensitivity and noise."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
import torch

from evoclone.federated.arm_shift import _terms, arm_sums, fit_arm_shift, newton_step, noised_sums, query_share
from evoclone.federated.models.fusion import FusionConfig
from evoclone.federated.predictor import FusionEnsemble
from evoclone.federated.training import build_model

ARM = 2  # the arm's static column in these arrays


def _data(endpoint: str, n: int = 600, seed: int = 0) -> tuple[FusionEnsemble, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cfg = FusionConfig(static_dim=4, visit_dim=3, max_visits=2, d_model=8, n_heads=2, endpoint=endpoint,
                       time_bins=4, horizon_days=400.0)
    torch.manual_seed(seed)
    ens = FusionEnsemble(cfg, [build_model(cfg, seed=seed)])
    static = rng.normal(size=(n, 4)).astype(np.float32)
    static[:, ARM] = rng.integers(0, 2, n)
    lin = 0.5 * static[:, 0] - 0.8 * static[:, ARM]
    t, c = rng.exponential(300 * np.exp(-lin)), rng.uniform(50, 600, n)
    arrays = {"static": static, "visits": rng.normal(size=(n, 2, 3)).astype(np.float32),
              "lengths": np.full(n, 2), "time": np.minimum(t, c).astype(np.float32),
              "event": (t <= c).astype(np.float32),
              "binary": (rng.random(n) < 1 / (1 + np.exp(-lin))).astype(np.float32)}
    ens.arm_column = ARM
    return ens, arrays


def _reference(ens: FusionEnsemble, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """statsmodels: Bernoulli GLM of the likelihood's terms, arm indicators as the only covariates, the
    ensemble's logits as offset (person-period rows for discrete time)."""
    z = ens.member_outputs(arrays)[0].astype(np.float64)  # (B, out)
    arm = arrays["static"][:, ARM] > 0.5
    if ens.cfg.endpoint == "time_to_event":
        at_risk, y = (t.numpy().astype(bool) for t in _terms(ens.cfg, torch.as_tensor(arrays["time"]),
                                                               torch.as_tensor(arrays["event"])))
        rows, cols = np.nonzero(at_risk)
        yy, off, a = y.astype(float)[rows, cols], z[rows, cols], arm[rows]
    else:
        yy, off, a = arrays["binary"].astype(float), z[:, 0], arm
    X = np.column_stack([~a, a]).astype(float)
    fit = sm.GLM(yy, X, family=sm.families.Binomial(), offset=off).fit(tol=1e-12)
    return fit.params


@pytest.mark.parametrize("endpoint", ["time_to_event", "binary"])
def test_the_shifts_are_the_maximum_likelihood_fit_with_the_network_as_offset(endpoint):
    ens, arrays = _data(endpoint)
    shift = fit_arm_shift(ens, arrays)
    assert shift == pytest.approx(tuple(_reference(ens, arrays)), abs=1e-6)
    assert np.abs(arm_sums(ens, arrays, shift=shift)[[0, 2]]).max() < 1e-6  # the score is zero there
    # applied: only the treated rows' outputs move, by gamma_1; the control rows by gamma_0
    before = ens.member_outputs(arrays)
    ens.arm_shift = shift
    after = ens.member_outputs(arrays)
    treated = arrays["static"][:, ARM] > 0.5
    assert np.allclose(after[:, treated] - before[:, treated], shift[1], atol=1e-5)
    assert np.allclose(after[:, ~treated] - before[:, ~treated], shift[0], atol=1e-5)
    # and kept with the model
    again = FusionEnsemble.from_state(ens.meta(), ens.state_tensors())
    assert again.arm_shift == pytest.approx(shift) and again.arm_column == ARM
    assert np.allclose(again.member_outputs(arrays), after, atol=1e-6)


def test_one_newton_step_from_the_sums_and_too_little_information():
    assert newton_step(np.array([2.0, 4.0, -3.0, 6.0])) == (0.5, -0.5)
    assert newton_step(np.array([2.0, 4.0, -0.1, 0.5])) is None  # an arm with almost no information


def test_a_patient_moves_the_clipped_sums_by_at_most_the_clip_and_the_noise_has_the_documented_sd():
    ens, arrays = _data("time_to_event", n=300)
    clip = 1.0
    base = arm_sums(ens, arrays, clip=clip)
    for i in range(20):  # removing any one patient changes one arm's (U, I) by at most clip each
        keep = np.arange(len(arrays["static"])) != i
        diff = np.abs(base - arm_sums(ens, {k: v[keep] for k, v in arrays.items()}, clip=clip))
        assert diff.max() <= clip + 1e-9 and np.count_nonzero(diff > 1e-12) <= 2
    rng = np.random.default_rng(0)
    draws = np.array([noised_sums(ens, arrays, clip=clip, noise_multiplier=3.0, rng=rng) for _ in range(400)])
    assert draws.mean(axis=0) == pytest.approx(base, abs=1.5)
    assert draws.std(axis=0) == pytest.approx(np.full(4, 3.0 * clip * np.sqrt(2)), rel=0.15)


def test_query_share_applies_to_fusion_time_to_event_and_binary_only():
    assert query_share("fusion", {"endpoint": "time_to_event", "arm-shift-share": 0.1}) == 0.1
    assert query_share("fusion", {"endpoint": "continuous", "arm-shift-share": 0.1}) == 0.0
    assert query_share("gpt", {"endpoint": "time_to_event", "arm-shift-share": 0.1}) == 0.0
    with pytest.raises(ValueError, match="arm-shift-share"):
        query_share("fusion", {"endpoint": "binary", "arm-shift-share": 1.0})
