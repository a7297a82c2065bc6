"""The arm's effect re-estimated on a trained ensemble (federated.arm_shift): the per-arm gammas equal a
statsmodels GLM with the network as offset (Poisson on observed and expected events, Bernoulli on the logit),
act only on the chosen arm's outputs (proportional hazards, or a logit shift), survive saving, and the site's
noised sums have the documented sensitivity and noise."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
import torch

from evoclone.federated.arm_shift import _terms, apply, arm_sums, effect_se, estimate, fit_arm_shift, \
    noise_cov, noised_sums, patient_terms, query_share, sensitivity, standard_errors, transform
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


def _reference_fit(ens: FusionEnsemble, arrays: dict[str, np.ndarray]):
    """statsmodels with the arm indicators as the only covariates and the network as offset: a Poisson GLM of
    each patient's events with its cumulative hazard over the bins at risk as exposure (time to event), or a
    Binomial GLM with the logit as offset (binary)."""
    z = ens.member_outputs(arrays)[0].astype(np.float64)  # (B, out)
    arm = arrays["static"][:, ARM] > 0.5
    X = np.column_stack([~arm, arm]).astype(float)
    if ens.cfg.endpoint == "time_to_event":
        at_risk, y = (t.numpy() for t in _terms(ens.cfg, torch.as_tensor(arrays["time"]),
                                                torch.as_tensor(arrays["event"])))
        events = (y * at_risk).sum(axis=1)
        exposure = (np.log1p(np.exp(z)) * at_risk).sum(axis=1)  # -log(1 - sigmoid(z)) per bin at risk
        return sm.GLM(events, X, family=sm.families.Poisson(), exposure=exposure).fit(tol=1e-12)
    return sm.GLM(arrays["binary"].astype(float), X, family=sm.families.Binomial(), offset=z[:, 0]).fit(tol=1e-12)


def _reference(ens: FusionEnsemble, arrays: dict[str, np.ndarray]) -> np.ndarray:
    return _reference_fit(ens, arrays).params


@pytest.mark.parametrize("endpoint", ["time_to_event", "binary"])
def test_the_shifts_are_the_maximum_likelihood_fit_with_the_network_as_offset(endpoint):
    ens, arrays = _data(endpoint)
    shift = fit_arm_shift(ens, arrays)
    assert shift == pytest.approx(tuple(_reference(ens, arrays)), abs=1e-6)
    # applied to each arm's rows only: the cumulative hazard scaled by exp(gamma) (proportional hazards), or
    # the logit shifted by gamma
    before = ens.member_outputs(arrays)
    ens.arm_shift = shift
    after = ens.member_outputs(arrays)
    treated = arrays["static"][:, ARM] > 0.5
    for rows, gamma in ((treated, shift[1]), (~treated, shift[0])):
        if endpoint == "time_to_event":
            cum = lambda z: np.log1p(np.exp(z)).sum(axis=-1)  # noqa: E731 (-sum log S over the bins)
            assert np.allclose(cum(after[:, rows]), np.exp(gamma) * cum(before[:, rows]), rtol=1e-4)
        else:
            assert np.allclose(after[:, rows] - before[:, rows], gamma, atol=1e-5)
    # and kept with the model
    again = FusionEnsemble.from_state(ens.meta(), ens.state_tensors())
    assert again.arm_shift == pytest.approx(shift) and again.arm_column == ARM
    assert np.allclose(again.member_outputs(arrays), after, atol=1e-6)


@pytest.mark.parametrize("endpoint", ["time_to_event", "binary"])
def test_standard_errors_are_the_glms_plus_the_noise_of_the_sums(endpoint):
    ens, arrays = _data(endpoint)
    sums = arm_sums(ens, arrays)
    ref = _reference_fit(ens, arrays).bse
    # time to event: 1/O per arm is the Poisson GLM's variance exactly; binary: the information at the
    # unshifted model (the one Newton step the federated estimate takes) against the GLM's at its optimum
    tol = dict(abs=1e-6) if endpoint == "time_to_event" else dict(rel=0.1)
    assert standard_errors(endpoint, sums) == pytest.approx(tuple(ref), **tol)
    independent = 25.0 * np.eye(2)
    noisy = standard_errors(endpoint, sums, independent)
    assert all(n > p for n, p in zip(noisy, standard_errors(endpoint, sums)))
    a0, b0, _, _ = sums
    if endpoint == "time_to_event":
        assert noisy[0] ** 2 == pytest.approx(1 / a0 + 25.0 * (1 / a0 ** 2 + 1 / b0 ** 2))
        # noise that moves O and E together barely moves log(O / E): the delta method's covariance term
        together = standard_errors(endpoint, sums, 25.0 * np.ones((2, 2)))[0]
        assert together ** 2 == pytest.approx(1 / a0 + 25.0 * (1 / a0 - 1 / b0) ** 2)
    else:
        assert noisy[0] ** 2 == pytest.approx(1 / b0 + 25.0 * (1 / b0 ** 2 + a0 ** 2 / b0 ** 4))
    assert effect_se(endpoint, sums, independent) == pytest.approx(np.hypot(*noisy))


def test_the_estimator_from_summed_sums_and_too_little_information():
    assert estimate("binary", np.array([2.0, 4.0, -3.0, 6.0])) == (0.5, -0.5)  # one Newton step U / I
    assert estimate("binary", np.array([2.0, 4.0, -0.1, 0.5])) is None  # an arm with almost no information
    assert estimate("time_to_event", np.array([30.0, 20.0, 10.0, 20.0])) == pytest.approx((np.log(1.5), np.log(0.5)))
    assert estimate("time_to_event", np.array([30.0, 20.0, -2.0, 20.0])) is None  # noise ate the arm's events


@pytest.mark.parametrize("endpoint,clip", [("time_to_event", 0.5), ("time_to_event", 1.0), ("binary", 1.0)])
def test_a_patient_moves_the_release_by_at_most_the_sensitivity_and_the_noise_has_the_documented_covariance(
        endpoint, clip):
    ens, arrays = _data(endpoint, n=300)
    m = transform(endpoint, clip)
    released = lambda sums: (sums.reshape(2, 2) @ m.T).reshape(4)  # noqa: E731 (each arm's pair through M)
    base = arm_sums(ens, arrays, clip=clip)
    moves = []
    for i in range(60):  # removing any one patient changes one arm's released pair by at most the sensitivity
        keep = np.arange(len(arrays["static"])) != i
        diff = np.abs(released(base) - released(arm_sums(ens, {k: v[keep] for k, v in arrays.items()}, clip=clip)))
        moves.append(np.linalg.norm(diff))
        # the other arm's pair moves only by float rounding (the network scores a batch one patient shorter)
        assert np.count_nonzero(diff > 1e-6) <= 2
    assert max(moves) <= sensitivity(endpoint, clip) + 1e-9
    rng = np.random.default_rng(0)
    draws = np.array([noised_sums(ens, arrays, clip=clip, noise_multiplier=3.0, rng=rng) for _ in range(2000)])
    cov = noise_cov(endpoint, clip, 3.0 * sensitivity(endpoint, clip))
    assert draws.mean(axis=0) == pytest.approx(base, abs=0.5)
    for arm in (0, 1):
        assert np.abs(np.cov(draws[:, 2 * arm:2 * arm + 2].T) - cov).max() <= 0.1 * cov.max()


def test_the_time_to_event_release_noises_the_log_effect_far_less_than_independent_noise_at_the_same_privacy():
    # the same noise multiplier, hence the same charge: (O - E, w E) at sensitivity 1 against (O, E) noised
    # independently at sqrt(1 + c^2), as first built; the spread of the log hazard ratio is what the twins carry
    ens, arrays = _data("time_to_event", n=600)
    clip, sigma = 0.5, 3.0
    assert sensitivity("time_to_event", clip) == pytest.approx(1.0)
    base = arm_sums(ens, arrays, clip=clip)
    rng = np.random.default_rng(1)
    draws = np.array([noised_sums(ens, arrays, clip=clip, noise_multiplier=sigma, rng=rng) for _ in range(3000)])
    independent = base + rng.normal(0.0, sigma * np.sqrt(1 + clip ** 2), size=draws.shape)
    log_hr = lambda s: np.log(s[:, 2] / s[:, 3]) - np.log(s[:, 0] / s[:, 1])  # noqa: E731
    new_sd, old_sd = log_hr(draws).std(), log_hr(independent).std()
    assert new_sd < 0.6 * old_sd
    # and the coordinator's standard error predicts it: the sampling part removed, the noise part is the spread
    noise_sd = lambda cov: np.sqrt(effect_se("time_to_event", base, cov) ** 2  # noqa: E731
                                   - effect_se("time_to_event", base) ** 2)
    assert noise_sd(noise_cov("time_to_event", clip, sigma)) == pytest.approx(new_sd, rel=0.1)  # sensitivity 1
    assert noise_sd(sigma ** 2 * (1 + clip ** 2) * np.eye(2)) == pytest.approx(old_sd, rel=0.1)


def test_binary_information_terms_are_bounded_by_a_quarter_so_the_noise_is_smaller():
    ens, arrays = _data("binary", n=300)
    _, _, info = patient_terms(ens, arrays)
    assert info.max() <= 0.25
    assert sensitivity("binary", 1.0) == pytest.approx(np.sqrt(1 + 1 / 16))
    assert sensitivity("binary", 0.1) == pytest.approx(np.sqrt(1.01))
    assert sensitivity("time_to_event", 0.5) == pytest.approx(1.0)  # (O - E, sqrt(3) E): see the test above
    assert sensitivity("time_to_event", 1.0) == pytest.approx(np.sqrt(2))
    with pytest.raises(ValueError, match="arm-shift-clip"):
        sensitivity("time_to_event", 0.0)


def _from_the_network(ens: FusionEnsemble, n: int, gamma: tuple[float, float], seed: int) -> dict[str, np.ndarray]:
    """Patients whose outcomes follow the network's own discrete hazards with each arm's cumulative hazard
    scaled by exp(gamma_arm): events early in their bin, survivors censored at the horizon."""
    ens_data = _data("time_to_event", n=n, seed=seed)[1]
    cfg, rng = ens.cfg, np.random.default_rng(seed + 1)
    z = torch.as_tensor(ens.member_outputs(ens_data)[0], dtype=torch.float64)  # (B, K)
    treated = ens_data["static"][:, ARM] > 0.5
    g = torch.as_tensor(np.where(treated, gamma[1], gamma[0]))[:, None]
    hazard = torch.sigmoid(apply("time_to_event", z, g)).numpy()  # per-bin event probability under the shift
    hit = rng.random(hazard.shape) < hazard
    first = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    width = cfg.horizon_days / cfg.time_bins
    ens_data["time"] = np.where(first >= 0, (first + 0.25) * width, cfg.horizon_days).astype(np.float32)
    ens_data["event"] = (first >= 0).astype(np.float32)
    return ens_data


def test_the_hazard_budget_cuts_follow_up_without_biasing_the_estimate():
    # the bound of a patient's expected events comes from cutting its follow-up at the last bin within the
    # budget (a stopping time set by the network, not by the outcome), so log(O/E) stays unbiased; clipping E
    # instead would inflate the high-risk patients' O/E
    ens, base = _data("time_to_event")
    z = ens.member_outputs(base)[0]
    a = 1.0 / z.std()  # the logit map: patients' hazards spread widely, each bin's hazard small (Poisson regime)
    ens.calibration = [(a, -4.0 - a * z.mean())]
    truth = (0.3, -0.4)
    arrays = _from_the_network(ens, 40_000, truth, seed=3)
    _, observed, expected = patient_terms(ens, arrays)
    budget = float(np.quantile(expected, 0.3))  # most patients' follow-up is cut
    _, o_cut, e_cut = patient_terms(ens, arrays, budget=budget)
    assert e_cut.max() <= budget + 1e-12 and np.all(e_cut <= expected + 1e-12) and np.all(o_cut <= observed)
    assert (e_cut < expected - 1e-9).mean() > 0.5
    full = estimate("time_to_event", arm_sums(ens, arrays))
    cut = estimate("time_to_event", arm_sums(ens, arrays, clip=budget))
    assert full == pytest.approx(truth, abs=0.08) and cut == pytest.approx(truth, abs=0.08)
    e_clipped = np.minimum(expected, budget)  # the biased alternative: the same bound by clipping
    arm = arrays["static"][:, ARM] > 0.5
    clipped = [np.log(observed[m].sum() / e_clipped[m].sum()) for m in (~arm, arm)]
    assert min(clipped[0] - truth[0], clipped[1] - truth[1]) > 0.4
    # a budget above every patient's hazard cuts nothing
    assert np.allclose(arm_sums(ens, arrays, clip=float(expected.max()) + 1), arm_sums(ens, arrays))


def test_query_share_applies_to_fusion_time_to_event_and_binary_only():
    assert query_share("fusion", {"endpoint": "time_to_event", "arm-shift-share": 0.1}) == 0.1
    assert query_share("fusion", {"endpoint": "continuous", "arm-shift-share": 0.1}) == 0.0
    assert query_share("gpt", {"endpoint": "time_to_event", "arm-shift-share": 0.1}) == 0.0
    with pytest.raises(ValueError, match="arm-shift-share"):
        query_share("fusion", {"endpoint": "binary", "arm-shift-share": 1.0})
