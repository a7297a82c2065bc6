"""The arm's effect re-estimated on top of a trained fusion ensemble: per-arm shifts of its outputs.

Networks trained with early stopping (and DP noise) learn a treatment's effect shrunk
towards none: the arm is one input among many and its share of the loss is small. After
training, EvoClone re-fits two numbers by maximum likelihood with the ensemble's own
predictions as an offset: a shift gamma_a of every output logit (discrete-time hazard
logits, or the binary logit) for the patients of arm a. gamma_1 - gamma_0 is then an
unpenalized estimate of the arm's log-hazard (log-odds) effect adjusted for the network's
prognosis, the model's twins carry it, and the prognostic part of the network is untouched.

The likelihood is the one the ensemble was trained on (discrete-time logistic hazard, or
Bernoulli), averaged over members. Each patient adds a score U_i = sum of (y - h) over the
terms it is at risk in, and an information I_i = sum of h(1 - h), to its own arm's sums, so:

- centrally, without DP, Newton's method on the pooled sums converges in a few steps;
- federated, each site sends (U_0, I_0, U_1, I_1) once, per-patient contributions clipped
  to [-c, c] and [0, c] and Gaussian noise added: L2 sensitivity c * sqrt(2) per patient
  (one patient moves one arm's pair by at most c each). That is one Gaussian mechanism
  with sample rate 1, charged to the site's ledger and composed by its Opacus accountant
  with the run's training; the coordinator takes one Newton step from 0 on the sums.
"""

from __future__ import annotations

import numpy as np
import torch

from .models.fusion import bin_index

ENDPOINTS = ("time_to_event", "binary")  # continuous endpoints: the twins take the residual spread instead
MIN_INFORMATION = 1.0  # an arm whose (noisy) information is below this gets no shift: too little to estimate


def query_share(task_name: str, rc) -> float:
    """The share of each site's target epsilon a federated run keeps for the arm-effect query (0: none):
    fusion models of time-to-event and binary endpoints, run config `arm-shift-share`."""
    if task_name != "fusion" or str(rc.get("endpoint", "")) not in ENDPOINTS:
        return 0.0
    share = float(rc.get("arm-shift-share", 0.0))
    if not 0.0 <= share < 1.0:
        raise ValueError(f"run config arm-shift-share must be in [0, 1), got {share}")
    return share


def arm_index(spec) -> int:
    """Column of the arm indicator in the static features."""
    return spec.feature_names()[0].index("arm")


def _terms(cfg, time: torch.Tensor, event: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(at_risk, y) per patient and time bin (B, K) of the discrete-hazard likelihood (fusion.discrete_hazard_nll)."""
    j = bin_index(cfg, time)
    k = torch.arange(cfg.time_bins)[None, :]
    observed = (event > 0.5) & (time < cfg.horizon_days)
    width = cfg.horizon_days / cfg.time_bins
    late = (time - j.float() * width) >= width / 2
    at_j = (k == j[:, None])
    at_risk = (k < j[:, None]) | (at_j & (observed | late)[:, None])
    y = (at_j & observed[:, None]).double()
    return at_risk.double(), y


def patient_scores(ensemble, arrays: dict[str, np.ndarray], *, shift: tuple[float, float] = (0.0, 0.0)
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arm, U, I) per patient at the given per-arm shifts, averaged over the ensemble's members."""
    cfg = ensemble.cfg
    if cfg.endpoint not in ENDPOINTS:
        raise ValueError(f"arm shifts are fitted for {ENDPOINTS} endpoints, not {cfg.endpoint}")
    saved, ensemble.arm_shift = ensemble.arm_shift, None  # scores around the unshifted offset
    try:
        z = torch.as_tensor(ensemble.member_outputs(arrays), dtype=torch.float64)  # (M, B, out)
    finally:
        ensemble.arm_shift = saved
    arm = np.asarray(arrays["static"][:, ensemble.arm_column] > 0.5, dtype=np.int64)
    z = z + torch.as_tensor(np.where(arm == 1, shift[1], shift[0]), dtype=torch.float64)[None, :, None]
    h = torch.sigmoid(z)
    if cfg.endpoint == "time_to_event":
        at_risk, y = _terms(cfg, torch.as_tensor(arrays["time"], dtype=torch.float32),
                            torch.as_tensor(arrays["event"], dtype=torch.float32))
        u = ((y[None] - h) * at_risk[None]).sum(dim=2)
        info = (h * (1 - h) * at_risk[None]).sum(dim=2)
    else:
        y = torch.as_tensor(arrays["binary"], dtype=torch.float64)
        u, info = y[None] - h[..., 0], (h * (1 - h))[..., 0]
    return arm, u.mean(dim=0).numpy(), info.mean(dim=0).numpy()


def arm_sums(ensemble, arrays: dict[str, np.ndarray], *, clip: float | None = None,
             shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """[U_0, I_0, U_1, I_1]: each arm's score and information sums (per-patient terms clipped when `clip`)."""
    arm, u, info = patient_scores(ensemble, arrays, shift=shift)
    if clip is not None:
        u, info = np.clip(u, -clip, clip), np.clip(info, 0.0, clip)
    return np.array([u[arm == 0].sum(), info[arm == 0].sum(), u[arm == 1].sum(), info[arm == 1].sum()])


def newton_step(sums: np.ndarray) -> tuple[float, float] | None:
    """(gamma_0, gamma_1) = U_a / I_a; None when either arm's information is too small to estimate."""
    u0, i0, u1, i1 = (float(x) for x in sums)
    if i0 < MIN_INFORMATION or i1 < MIN_INFORMATION:
        return None
    return u0 / i0, u1 / i1


def fit_arm_shift(ensemble, arrays: dict[str, np.ndarray], *, iterations: int = 50, tol: float = 1e-10
                  ) -> tuple[float, float] | None:
    """Maximum-likelihood per-arm shifts on pooled data (no DP): Newton's method from (0, 0), each step capped
    at 1 (the likelihood is concave in the shifts, so capped Newton steps converge). None without an arm's data."""
    shift = np.zeros(2)
    for _ in range(iterations):
        u0, i0, u1, i1 = arm_sums(ensemble, arrays, shift=(float(shift[0]), float(shift[1])))
        if i0 <= 1e-12 or i1 <= 1e-12:
            return None
        step = np.clip([u0 / i0, u1 / i1], -1.0, 1.0)
        shift += step
        if np.abs(step).max() < tol:
            break
    return float(shift[0]), float(shift[1])


def noised_sums(ensemble, arrays: dict[str, np.ndarray], *, clip: float, noise_multiplier: float,
                rng: np.random.Generator) -> np.ndarray:
    """The site's clipped sums with Gaussian noise of sd noise_multiplier * clip * sqrt(2) on each coordinate."""
    sums = arm_sums(ensemble, arrays, clip=clip)
    return sums + rng.normal(0.0, noise_multiplier * clip * np.sqrt(2.0), size=4)
