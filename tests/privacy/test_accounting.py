import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from evoclone.privacy.accounting import LedgerEntry, PrivacyLedger, calibrate_noise, epsilon_of


def test_epsilon_matches_opacus_rdp_accountant():
    history = [(1.1, 0.2, 30), (2.0, 0.5, 7), (1.1, 0.2, 5)]
    acc = RDPAccountant()
    acc.history = list(history)
    assert epsilon_of(history, delta=1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)


def test_calibration_matches_opacus_without_prior_and_stays_within_target():
    sigma = calibrate_noise(prior=[], target_epsilon=3.0, delta=1e-5, sample_rate=0.25, steps=24)
    ref = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.25, steps=24)
    assert sigma == pytest.approx(ref, rel=1e-3)
    eps = epsilon_of([(sigma, 0.25, 24)], delta=1e-5)
    assert 2.99 - 1e-9 <= eps <= 3.0


def test_calibration_composes_with_prior_spend():
    prior = [(1.5, 0.3, 10)]
    spent = epsilon_of(prior, delta=1e-5)
    sigma = calibrate_noise(prior=prior, target_epsilon=spent + 1.0, delta=1e-5, sample_rate=0.3, steps=10)
    total = epsilon_of([*prior, (sigma, 0.3, 10)], delta=1e-5)
    assert spent + 1.0 - 0.011 <= total <= spent + 1.0


def test_ledger_refuses_overspend_and_roundtrips():
    ledger = PrivacyLedger(epsilon_budget=1.0, delta=1e-5)
    assert ledger.spent() == 0.0
    sigma = calibrate_noise(prior=[], target_epsilon=0.9, delta=1e-5, sample_rate=0.1, steps=50)
    ledger.charge(LedgerEntry(run_id="r1", round=1, noise_multiplier=sigma, sample_rate=0.1, steps=50))
    assert 0.8 < ledger.spent() <= 0.9
    assert not ledger.would_fit(noise_multiplier=sigma, sample_rate=0.1, steps=50)
    with pytest.raises(ValueError, match="exceed"):
        ledger.charge(LedgerEntry(run_id="r1", round=2, noise_multiplier=sigma, sample_rate=0.1, steps=50))
    restored = PrivacyLedger.from_state_dict(ledger.state_dict())
    assert restored.spent() == ledger.spent() and len(restored.entries) == 1
    with pytest.raises(ValueError, match="exhausted"):
        calibrate_noise(prior=[(0.5, 1.0, 100)], target_epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=1)


@pytest.mark.parametrize("kwargs", [dict(epsilon_budget=0, delta=1e-5), dict(epsilon_budget=-1, delta=1e-5),
                                    dict(epsilon_budget=1, delta=0), dict(epsilon_budget=1, delta=1e-5, accountant="x")])
def test_bad_parameters_fail_early(kwargs):
    with pytest.raises(ValueError):
        PrivacyLedger(**kwargs)
