"""The arm's effect re-estimated on top of a trained fusion ensemble: one multiplier per arm.

Networks trained with early stopping (and DP noise) learn a treatment's effect shrunk towards
none: the arm is one input among many and its share of the loss is small. After training,
EvoClone re-fits one number per arm by maximum likelihood with the ensemble's own
predictions as an offset, and the model applies it to that arm's patients:

- time to event: the cumulative hazard of every bin is multiplied by exp(gamma_a), i.e. each
  bin's survival S becomes S ** exp(gamma_a) (proportional hazards). gamma_a is the maximum
  likelihood estimate of a Poisson (piecewise-exponential) model with the network's
  cumulative hazard as exposure: log(O_a / E_a), observed over expected events, in closed
  form, however badly the network's baseline is calibrated;
- binary: the logit is shifted by gamma_a (Newton's method on the Bernoulli likelihood).

gamma_1 - gamma_0 is then an unpenalized estimate of the arm's log-hazard (log-odds) effect
adjusted for the network's prognosis; the twins carry it and the network is untouched. The
ensemble's members are averaged. Each patient adds (O_i, E_i), or a score and information
(U_i, I_i), to its own arm's sums, so:

- centrally, without DP, the sums give the estimate exactly;
- federated, each site releases its sums once, per-patient terms bounded, with Gaussian noise: one
  Gaussian mechanism with sample rate 1, charged to the site's ledger and composed by its Opacus
  accountant with the run's training; the coordinator applies the estimator to the summed noisy
  sums (for binary endpoints, one Newton step from 0).

  What is noised is each arm's pair through a fixed linear map M: for time to event (O_i - E_i, w E_i),
  for binary (U_i, I_i) as they are. The estimate log(O/E) moves with O - E, while noise on E alone
  moves O and E together and nearly cancels; noising O and E independently, as this module first did,
  put the full noise on both terms of the log ratio. At the default budget c = 0.5 and w = sqrt(3),
  the largest weight that keeps the sensitivity at 1, the noise variance of log(O/E) at a calibrated
  network is sd^2 / O^2 against 2.5 sd^2 / O^2 for (O, E) noised independently with its sensitivity
  sqrt(1 + c^2): the same privacy for 2.5 times less noise variance on the effect. The site maps the
  noised pair back (post-processing) and sends (O, E) sums with their noise covariance
  sd^2 M^-1 M^-T, from which the coordinator's standard errors follow. The sensitivity is the largest
  norm of M x_i over the box of a patient's terms (a convex function peaks at a corner): O_i in
  [0, 1] and E_i in [0, c], or U_i in [-1, 1] and I_i in [0, b].

  For time to event, E_i is bounded without bias by a hazard budget c (`arm-shift-clip`): each
  patient's follow-up is cut, for this estimate only, at the last bin where the network's
  cumulative hazard is still within c, and O_i counts only the events up to that bin. The cut is
  a stopping time fixed by the network's prediction, not by the outcome, so the Poisson likelihood
  and its estimate log(O/E) stay unbiased (clipping E_i instead would inflate O/E for high-risk
  patients); a smaller c lowers the noise and gives up the late follow-up of high-risk patients.
  For binary endpoints I_i = p(1 - p) is at most 1/4, so b = min(c, 1/4).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

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


def apply(endpoint: str, logits: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Outputs with a per-row gamma applied: survival per bin raised to exp(gamma), or the logit shifted."""
    if endpoint != "time_to_event":
        return logits + gamma
    log_surv = F.logsigmoid(-logits) * torch.exp(gamma)  # log S' = exp(gamma) log S
    return torch.log(torch.clamp(-torch.expm1(log_surv), min=1e-30)) - log_surv  # logit of h' = 1 - S'


def patient_terms(ensemble, arrays: dict[str, np.ndarray], *, budget: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arm, a, b) per patient at the unshifted model, averaged over members: observed events and expected
    events (cumulative hazard over the bins at risk) for time to event, each patient's follow-up cut at the
    last bin where that hazard is within `budget` when one is given; score y - p and information p(1 - p)
    for binary."""
    cfg = ensemble.cfg
    if cfg.endpoint not in ENDPOINTS:
        raise ValueError(f"arm shifts are fitted for {ENDPOINTS} endpoints, not {cfg.endpoint}")
    saved, ensemble.arm_shift = ensemble.arm_shift, None
    try:
        z = torch.as_tensor(ensemble.member_outputs(arrays), dtype=torch.float64)  # (M, B, out)
    finally:
        ensemble.arm_shift = saved
    arm = np.asarray(arrays["static"][:, ensemble.arm_column] > 0.5, dtype=np.int64)
    if cfg.endpoint == "time_to_event":
        at_risk, y = _terms(cfg, torch.as_tensor(arrays["time"], dtype=torch.float32),
                            torch.as_tensor(arrays["event"], dtype=torch.float32))
        hazard = (-F.logsigmoid(-z) * at_risk[None]).mean(dim=0)  # (B, K): the members' mean, per bin at risk
        if budget is not None:  # the stopping time: bins up to the last one within the hazard budget
            kept = (torch.cumsum(hazard, dim=1) <= budget).double()
            hazard, y = hazard * kept, y * kept
        return arm, (y * at_risk).sum(dim=1).numpy(), hazard.sum(dim=1).numpy()
    p = torch.sigmoid(z[..., 0])
    y = torch.as_tensor(arrays["binary"], dtype=torch.float64)
    return arm, (y[None] - p).mean(dim=0).numpy(), (p * (1 - p)).mean(dim=0).numpy()


def b_bound(endpoint: str, clip: float) -> float:
    """The bound of a patient's b-term under `clip`: the hazard budget (time to event), or min(clip, 1/4), as
    p(1 - p) never exceeds 1/4 (binary)."""
    if clip <= 0:
        raise ValueError(f"run config arm-shift-clip must be positive, got {clip}")
    return float(clip) if endpoint == "time_to_event" else min(float(clip), 0.25)


def arm_sums(ensemble, arrays: dict[str, np.ndarray], *, clip: float | None = None) -> np.ndarray:
    """[a_0, b_0, a_1, b_1]: each arm's sums of the patient terms; with `clip`, each term bounded (time to
    event: follow-up cut at the hazard budget `clip`, see the module's docstring)."""
    endpoint = ensemble.cfg.endpoint
    arm, a, b = patient_terms(ensemble, arrays, budget=clip if endpoint == "time_to_event" else None)
    a = np.clip(a, _a_low(endpoint), 1.0)  # already within: O_i is 0 or 1, y - p lies in [-1, 1]
    if clip is not None:
        b = np.clip(b, 0.0, b_bound(endpoint, clip))  # already within, up to rounding
    return np.array([a[arm == 0].sum(), b[arm == 0].sum(), a[arm == 1].sum(), b[arm == 1].sum()])


def estimate(endpoint: str, sums: np.ndarray) -> tuple[float, float] | None:
    """(gamma_0, gamma_1) from the sums: log(O/E) per arm, or one Newton step U/I; None when an arm has too
    few (noisy) events or too little information to estimate."""
    a0, b0, a1, b1 = (float(x) for x in sums)
    if endpoint == "time_to_event":
        if min(a0, b0, a1, b1) < MIN_INFORMATION:
            return None
        return math.log(a0 / b0), math.log(a1 / b1)
    if b0 < MIN_INFORMATION or b1 < MIN_INFORMATION:
        return None
    return a0 / b0, a1 / b1


def standard_errors(endpoint: str, sums: np.ndarray, noise_cov: np.ndarray | None = None) -> tuple[float, float]:
    """Delta-method standard errors of (gamma_0, gamma_1) = estimate(endpoint, sums): the estimate's own
    sampling error (Poisson events, 1/O; binary, the inverse information 1/I at the unshifted model) plus,
    for noised sums, the noise's, where `noise_cov` is the 2 x 2 covariance of the noise on each arm's (a, b)
    sums, summed over the sites (`noise_cov()` per site)."""
    cov = np.zeros((2, 2)) if noise_cov is None else np.asarray(noise_cov, dtype=float)
    a0, b0, a1, b1 = (float(x) for x in sums)
    out = []
    for a, b in ((a0, b0), (a1, b1)):
        if endpoint == "time_to_event":  # gamma = log(a / b)
            var, grad = 1.0 / a, np.array([1.0 / a, -1.0 / b])
        else:  # gamma = a / b
            var, grad = 1.0 / b, np.array([1.0 / b, -a / b ** 2])
        out.append(math.sqrt(var + float(grad @ cov @ grad)))
    return out[0], out[1]


def effect_se(endpoint: str, sums: np.ndarray, noise_cov: np.ndarray | None = None) -> float:
    """Standard error of the log effect gamma_1 - gamma_0 (the arms' estimates are independent)."""
    se0, se1 = standard_errors(endpoint, sums, noise_cov)
    return math.hypot(se0, se1)


def fit_arm_shift(ensemble, arrays: dict[str, np.ndarray], *, iterations: int = 50, tol: float = 1e-10
                  ) -> tuple[float, float] | None:
    """Maximum-likelihood gammas on pooled data (no DP): closed form for time to event; for binary, Newton's
    method from 0 with steps capped at 1 (the likelihood is concave). None without an arm's data."""
    cfg = ensemble.cfg
    if cfg.endpoint == "time_to_event":
        a0, b0, a1, b1 = arm_sums(ensemble, arrays)
        if min(a0, b0, a1, b1) <= 0:
            return None
        return math.log(a0 / b0), math.log(a1 / b1)
    arm, _, _ = patient_terms(ensemble, arrays)
    if arm.min() == arm.max():
        return None
    saved, ensemble.arm_shift = ensemble.arm_shift, None
    try:
        z = torch.as_tensor(ensemble.member_outputs(arrays), dtype=torch.float64)[..., 0]  # (M, B)
    finally:
        ensemble.arm_shift = saved
    y = torch.as_tensor(arrays["binary"], dtype=torch.float64)
    treated = torch.as_tensor(arm == 1)
    gamma = np.zeros(2)
    for _ in range(iterations):
        p = torch.sigmoid(z + torch.where(treated, gamma[1], gamma[0]))
        u, info = (y[None] - p).mean(dim=0), (p * (1 - p)).mean(dim=0)
        step = np.clip([float(u[~treated].sum() / info[~treated].sum()),
                        float(u[treated].sum() / info[treated].sum())], -1.0, 1.0)
        gamma += step
        if np.abs(step).max() < tol:
            break
    return float(gamma[0]), float(gamma[1])


def _a_low(endpoint: str) -> float:
    """The lower bound of a patient's a-term: observed events are not negative, a binary score is."""
    return 0.0 if endpoint == "time_to_event" else -1.0


def transform(endpoint: str, clip: float) -> np.ndarray:
    """M, the map each arm's pair (a, b) goes through before the noise: (O - E, w E) for time to event with w
    the largest weight that keeps the sensitivity at 1 up to c = 1/sqrt(2) (w = sqrt(3) at c = 0.5), 1 past it
    (keeping it at 1 there takes a weight below 1, which would noise E more than O - E); the identity for binary
    (the score is already centred)."""
    c = b_bound(endpoint, clip)
    if endpoint != "time_to_event":
        return np.eye(2)
    w = math.sqrt(min(1.0 / c ** 2 - 1.0, 2.0 / c - 1.0)) if c < 1.0 / math.sqrt(2.0) else 1.0
    return np.array([[1.0, -1.0], [0.0, w]])


def sensitivity(endpoint: str, clip: float) -> float:
    """L2 sensitivity of a site's released sums to one patient: the largest norm of M (a_i, b_i) over the box
    of its terms, a in [_a_low, 1] and b in [0, b_bound] (the norm is convex, so a corner holds the maximum);
    one patient moves only its own arm's pair."""
    m, b = transform(endpoint, clip), b_bound(endpoint, clip)
    return float(max(np.linalg.norm(m @ np.array([a, e])) for a in (_a_low(endpoint), 1.0) for e in (0.0, b)))


def noise_cov(endpoint: str, clip: float, sd: float) -> np.ndarray:
    """Covariance (2 x 2) of the noise on one arm's (a, b) sums when its M-mapped pair got noise of sd `sd` on
    each coordinate: sd^2 M^-1 M^-T."""
    inv = np.linalg.inv(transform(endpoint, clip))
    return sd ** 2 * inv @ inv.T


def noised_sums(ensemble, arrays: dict[str, np.ndarray], *, clip: float, noise_multiplier: float,
                rng: np.random.Generator) -> np.ndarray:
    """The site's bounded sums [a_0, b_0, a_1, b_1], each arm's pair released through M with Gaussian noise of sd
    noise_multiplier * sensitivity on each coordinate and mapped back (post-processing)."""
    endpoint = ensemble.cfg.endpoint
    m = transform(endpoint, clip)
    pairs = arm_sums(ensemble, arrays, clip=clip).reshape(2, 2)  # rows: arms; columns: (a, b)
    released = pairs @ m.T + rng.normal(0.0, noise_multiplier * sensitivity(endpoint, clip), size=(2, 2))
    return np.linalg.solve(m, released.T).T.reshape(4)
