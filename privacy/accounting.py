"""Differential-privacy accounting on Opacus accountants, and the per-site budget ledger."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

ACCOUNTANTS = ("rdp", "prv")


def _check(*, epsilon: float | None = None, delta: float | None = None,
           sample_rate: float | None = None, steps: int | None = None) -> None:
    if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
    if delta is not None and not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if sample_rate is not None and not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")


@lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    # Opacus's RDP of one subsampled-Gaussian step; RDP composes linearly in steps, so
    # caching one step makes repeated ledger queries cheap without changing the result
    return np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                               orders=RDPAccountant.DEFAULT_ALPHAS))


def epsilon_of(history: list[tuple[float, float, int]], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by a history of (noise_multiplier, sample_rate, steps) per an Opacus accountant."""
    _check(delta=delta)
    if not history:
        return 0.0
    if accountant == "rdp":
        total = sum(_rdp_per_step(float(s), float(q)) * int(n) for s, q, n in history)
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
        return float(eps)
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(*, prior: list[tuple[float, float, int]], target_epsilon: float, delta: float,
                    sample_rate: float, steps: int, accountant: str = "rdp",
                    tolerance: float = 0.01) -> float:
    """Smallest noise multiplier whose `steps` on top of `prior` spend at most `target_epsilon`.

    Binary search like `opacus.accountants.utils.get_noise_multiplier`, but composing with
    what the site already spent, so a budget holds across rounds and runs.
    """
    _check(epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps)
    already = epsilon_of(prior, delta=delta, accountant=accountant)
    if already >= target_epsilon:
        raise ValueError(f"privacy budget exhausted: {already:.3f} of {target_epsilon:.3f} already spent")

    def eps(sigma: float) -> float:
        return epsilon_of([*prior, (sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError("no noise level reaches the target epsilon; raise the budget or lower the steps")
    while eps(high) < target_epsilon - tolerance and high - low > 1e-4:
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


@dataclass(frozen=True)
class LedgerEntry:
    """One charge against a site's budget: a round of DP-SGD."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int


class PrivacyLedger:
    """A site's (epsilon, delta) budget and every spend charged against it.

    Spent epsilon is always recomputed from the full history by an Opacus accountant.
    """

    def __init__(self, *, epsilon_budget: float, delta: float, accountant: str = "rdp") -> None:
        _check(epsilon=epsilon_budget, delta=delta)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.epsilon_budget = float(epsilon_budget)
        self.delta = float(delta)
        self.accountant = accountant
        self.entries: list[LedgerEntry] = []

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant history: (noise_multiplier, sample_rate, steps) per charge."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def spent(self) -> float:
        """Epsilon spent so far at the ledger's delta."""
        return epsilon_of(self.history, delta=self.delta, accountant=self.accountant)

    def remaining(self) -> float:
        """Epsilon left in the budget (never negative)."""
        return max(0.0, self.epsilon_budget - self.spent())

    def would_fit(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        """Whether one more charge keeps the spend within the budget."""
        _check(sample_rate=sample_rate, steps=steps)
        after = epsilon_of([*self.history, (noise_multiplier, sample_rate, steps)],
                           delta=self.delta, accountant=self.accountant)
        return after <= self.epsilon_budget + 1e-9

    def charge(self, entry: LedgerEntry) -> float:
        """Record a spend that fits the budget and return the new total epsilon."""
        if not self.would_fit(noise_multiplier=entry.noise_multiplier, sample_rate=entry.sample_rate,
                              steps=entry.steps):
            raise ValueError(f"charge would exceed the privacy budget of {self.epsilon_budget}")
        self.entries.append(entry)
        return self.spent()

    def state_dict(self) -> dict:
        """Everything needed to restore the ledger."""
        return {"epsilon_budget": self.epsilon_budget, "delta": self.delta, "accountant": self.accountant,
                "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PrivacyLedger":
        """Restore a ledger saved by `state_dict`."""
        ledger = cls(epsilon_budget=state["epsilon_budget"], delta=state["delta"],
                     accountant=state.get("accountant", "rdp"))
        ledger.entries = [LedgerEntry(**e) for e in state.get("entries", [])]
        return ledger
