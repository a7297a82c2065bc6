"""The fusion outcome predictor as a product: a calibrated deep ensemble with intervals and reasons.

`train_ensemble` trains M fusion models from different seeds (with or without DP-SGD,
through the one training loop), then calibrates each on validation data. `FusionEnsemble`
answers per patient: the risk (mean over members), an interval from the members' spread,
a risk category, and integrated-gradients attributions grouped into named features.

Risk categories (documented thresholds): for time-to-event, P(event by the model's
horizon), and for binary endpoints the probability, are "low" below 0.10, "moderate"
below 0.20, and "high" from 0.20 on (`RISK_THRESHOLDS`). Continuous endpoints have no
absolute scale, so their cut points are the tertiles of the validation predictions,
stored with the model: "low", "moderate", "high" predicted value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .features import FeatureSpec
from .models.fusion import FusionConfig, FusionPredictor, discrete_hazard_nll
from .trainer import DPSettings, TrainConfig, TrainResult, budgeted_dp, steps_per_epoch
from .training import build_model, mean_loss, train

RISK_THRESHOLDS = (0.10, 0.20)  # probability cut points: < 0.10 low, < 0.20 moderate, else high
CATEGORIES = ("low", "moderate", "high")
PERCENTILE_MIN_MEMBERS = 20  # fewer members make 2.5/97.5 percentiles meaningless: use mean +- 1.96 sd
IG_STEPS = 64
# time-to-event horizon: the 90th percentile of training follow-up, so the hazard bins use
# most of the observed follow-up (risk is then P(event by that horizon))
PREDICTOR_HORIZON_QUANTILE = 0.9
RISK_DEFINITIONS = {
    "time_to_event": "probability of the event by the horizon ({h:g} days)",
    "binary": "probability of the binary endpoint",
    "continuous": "predicted value of the continuous endpoint",
}
METRICS = {"time_to_event": "c_index", "binary": "auroc", "continuous": "r2"}
_Z95 = 1.959964


@dataclass(frozen=True)
class FeatureGroups:
    """How the model's input columns add up to named features (for explanations)."""

    names: tuple[str, ...]
    static: tuple[int, ...]  # index into names of each static column
    visit: tuple[int, ...]  # index into names of each visit column (summed over visits)


def feature_groups(spec: FeatureSpec) -> FeatureGroups:
    """Group `features.encode`'s columns: covariates, one-hot categories, arm, labs (value + presence)."""
    names: list[str] = []

    def group(name: str) -> int:
        if name not in names:
            names.append(name)
        return names.index(name)

    static = [group(num[0]) for num in spec.numeric] + [group(name) for name in spec.binary]
    for name, levels in spec.categorical:
        static += [group(name)] * len(levels)
    static.append(group("arm"))
    for lab in spec.labs:
        static += [group(lab[1])] * 2  # baseline value, presence
    if spec.lab_trends:
        static += [group(lab[1]) for lab in spec.labs]  # trend over the history window
    visit = [group("visit_timing")] * 2  # time, gap
    for lab in spec.labs:
        visit += [group(lab[1])] * 2
    if len(static) != spec.static_dim or len(visit) != spec.visit_dim:
        raise ValueError(f"feature spec layout changed: grouped {len(static)}/{len(visit)} columns, the spec "
                         f"has {spec.static_dim}/{spec.visit_dim}; update predictor.feature_groups")
    return FeatureGroups(tuple(names), tuple(static), tuple(visit))


def top_features(attr: np.ndarray, names: tuple[str, ...] | list[str], k: int = 3) -> list[list[str]]:
    """Per row, the names of the k features with the largest absolute attribution."""
    order = np.argsort(-np.abs(attr), axis=1, kind="stable")[:, :k]
    return [[names[j] for j in row] for row in order]


def _tensors(cfg: FusionConfig, arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked model inputs; bad input is a ValueError naming the rows, never a silent answer."""
    missing = [k for k in ("static", "visits", "lengths") if k not in arrays]
    if missing:
        raise ValueError(f"prediction input lacks {missing}; encode patients with features.encode_cohort")
    static, visits, lengths = (np.asarray(arrays[k]) for k in ("static", "visits", "lengths"))
    n = len(static)
    if static.shape != (n, cfg.static_dim) or visits.ndim != 3 or visits.shape[0] != n \
            or visits.shape[2] != cfg.visit_dim or lengths.shape != (n,):
        raise ValueError(f"input shapes static {static.shape}, visits {visits.shape}, lengths {lengths.shape} "
                         f"do not fit the model (static width {cfg.static_dim}, visit width {cfg.visit_dim}); "
                         "encode patients with the feature spec stored with the model")
    bad = ~np.isfinite(static).all(axis=1) | ~np.isfinite(visits).all(axis=(1, 2))
    bad |= (lengths < 1) | (lengths > visits.shape[1])
    if bad.any():
        raise ValueError(f"rows {np.flatnonzero(bad)[:10].tolist()} have NaN/infinite features or a visit count "
                         f"outside 1..{visits.shape[1]}; fix or drop them before predicting")
    return (torch.as_tensor(static, dtype=torch.float32), torch.as_tensor(visits, dtype=torch.float32),
            torch.as_tensor(lengths, dtype=torch.int64))


def _member_risk(cfg: FusionConfig, logits: torch.Tensor) -> torch.Tensor:
    """Calibrated logits (..., out_dim) -> risk (...): P(event by horizon), probability, or value."""
    if cfg.endpoint == "time_to_event":
        return -torch.expm1(F.logsigmoid(-logits).sum(dim=-1))  # 1 - prod_k (1 - h_k)
    if cfg.endpoint == "binary":
        return torch.sigmoid(logits.squeeze(-1))
    return logits.squeeze(-1)


def fit_calibration(cfg: FusionConfig, logits: torch.Tensor, targets: dict[str, torch.Tensor]
                    ) -> tuple[float, float]:
    """(scale, shift) of the affine map of logits that minimises the validation NLL.

    Time-to-event: every hazard logit is mapped alike, fitted on the discrete-hazard NLL;
    binary: Platt scaling on the logit. A small pull towards the identity keeps the two
    numbers finite on small validation sets (e.g. one without events).
    """
    if cfg.endpoint == "continuous" or len(logits) < 2:
        return 1.0, 0.0
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    logits = logits.detach().double()

    def nll(p: torch.Tensor) -> torch.Tensor:
        z = p[0] * logits + p[1]
        if cfg.endpoint == "time_to_event":
            loss = discrete_hazard_nll(cfg, z, targets["time"].double(), targets["event"].double()).mean()
        else:
            loss = F.binary_cross_entropy_with_logits(z.squeeze(-1), targets["binary"].double())
        return loss + 1e-3 * ((p[0] - 1) ** 2 + p[1] ** 2)

    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll(params)
        loss.backward()
        return loss

    opt.step(closure)
    fitted = params.detach()
    with torch.no_grad():
        if not torch.isfinite(fitted).all() or nll(fitted) > nll(torch.tensor([1.0, 0.0], dtype=torch.float64)):
            return 1.0, 0.0
    return float(fitted[0]), float(fitted[1])


class FusionEnsemble:
    """M fusion predictors with per-member calibration; answers risk, interval, category, reasons."""

    def __init__(self, cfg: FusionConfig, models: list[FusionPredictor], *,
                 calibration: list[tuple[float, float]] | None = None, residual_sd: float = 0.0,
                 tertiles: tuple[float, float] | None = None,
                 thresholds: tuple[float, float] = RISK_THRESHOLDS, arm_column: int | None = None,
                 arm_shift: tuple[float, float] | None = None) -> None:
        if not models:
            raise ValueError("an ensemble needs at least one member")
        self.cfg = cfg
        self.models = [m.eval() for m in models]
        self.calibration = list(calibration) if calibration is not None else [(1.0, 0.0)] * len(models)
        if len(self.calibration) != len(models):
            raise ValueError(f"{len(self.calibration)} calibrations for {len(models)} members")
        self.residual_sd = float(residual_sd)
        self.tertiles = tertiles
        self.thresholds = tuple(thresholds)
        # per-arm effects re-estimated after training (federated.arm_shift): (control, treatment) by the arm column
        self.arm_column = arm_column
        self.arm_shift = tuple(arm_shift) if arm_shift is not None else None
        if self.arm_shift is not None and arm_column is None:
            raise ValueError("an arm shift needs the arm's static column")

    @property
    def members(self) -> int:
        """Number of ensemble members."""
        return len(self.models)

    def _logits(self, static: torch.Tensor, visits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Calibrated logits of every member (M, B, out_dim); differentiable in the inputs."""
        out = []
        for model, (a, b) in zip(self.models, self.calibration):
            logits, _ = model(static, visits, lengths)  # (B, out_dim)
            out.append(a * logits + b)
        z = torch.stack(out)
        if self.arm_shift is not None:  # federated.arm_shift: each arm's effect re-estimated after training
            from .arm_shift import apply

            treated = static[:, self.arm_column] > 0.5
            gamma = torch.where(treated, self.arm_shift[1], self.arm_shift[0]).to(z.dtype)[None, :, None]
            z = apply(self.cfg.endpoint, z, gamma)
        return z

    def member_outputs(self, arrays: dict[str, np.ndarray], batch_size: int = 512) -> np.ndarray:
        """Calibrated outputs of each member for each row (M, B, out_dim): hazard logits, logit or value."""
        static, visits, lengths = _tensors(self.cfg, arrays)
        out = []
        with torch.no_grad():
            for i in range(0, len(static), batch_size):
                sl = slice(i, i + batch_size)
                out.append(self._logits(static[sl], visits[sl], lengths[sl]))
        if not out:
            return np.zeros((self.members, 0, self.cfg.out_dim), dtype=np.float32)
        return torch.cat(out, dim=1).numpy()

    def member_risks(self, arrays: dict[str, np.ndarray], batch_size: int = 512) -> np.ndarray:
        """Calibrated risk of each member for each row (M, B)."""
        return _member_risk(self.cfg, torch.as_tensor(self.member_outputs(arrays, batch_size))).numpy()

    def calibrate(self, val_arrays: dict[str, np.ndarray]) -> None:
        """Fit each member's logit map (or, for continuous endpoints, the residual sd and tertiles)."""
        static, visits, lengths = _tensors(self.cfg, val_arrays)
        targets = {f: torch.as_tensor(np.nan_to_num(val_arrays[f]), dtype=torch.float32)
                   for f in ("time", "event", "binary", "continuous")}
        self.calibration = [(1.0, 0.0)] * self.members
        with torch.no_grad():
            raw = self._logits(static, visits, lengths)  # (M, B, out_dim), identity maps
        self.calibration = [fit_calibration(self.cfg, raw[m], targets) for m in range(self.members)]
        if self.cfg.endpoint == "continuous" and len(static):
            mean = _member_risk(self.cfg, raw).mean(dim=0).numpy()
            self.residual_sd = float(np.sqrt(np.mean((targets["continuous"].numpy() - mean) ** 2)))
            low, high = np.quantile(mean, [1 / 3, 2 / 3])
            self.tertiles = (float(low), float(high))

    def categorize(self, risk: np.ndarray) -> np.ndarray:
        """Risk category per row, by the documented thresholds (continuous: validation tertiles)."""
        cuts = self.thresholds if self.cfg.endpoint != "continuous" else self.tertiles
        if cuts is None:
            raise ValueError("a continuous-endpoint ensemble needs validation tertiles; call calibrate(val) first")
        return np.asarray(CATEGORIES, dtype=object)[np.searchsorted(np.asarray(cuts), risk, side="right")]

    def risk(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Mean calibrated risk over members per row (no interval or category: needs no tertiles)."""
        return self.member_risks(arrays).astype(np.float64).mean(axis=0)

    def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """risk, ci_low, ci_high and category per row, in input order."""
        r = self.member_risks(arrays).astype(np.float64)  # (M, B)
        risk = r.mean(axis=0)
        sd = r.std(axis=0, ddof=1) if self.members > 1 else np.zeros_like(risk)
        if self.cfg.endpoint == "continuous":
            # predictive interval: the members' disagreement plus the validation residual spread
            half = _Z95 * np.sqrt(sd ** 2 + self.residual_sd ** 2)
            low, high = risk - half, risk + half
        elif self.members >= PERCENTILE_MIN_MEMBERS:
            low, high = np.percentile(r, [2.5, 97.5], axis=0)
        else:
            low, high = np.clip(risk - _Z95 * sd, 0.0, 1.0), np.clip(risk + _Z95 * sd, 0.0, 1.0)
        return {"risk": risk, "ci_low": low, "ci_high": high, "category": self.categorize(risk)}

    def _ensemble_risk(self, static: torch.Tensor, visits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The explained function: mean calibrated risk over members (B,)."""
        return _member_risk(self.cfg, self._logits(static, visits, lengths)).mean(dim=0)

    def explain(self, arrays: dict[str, np.ndarray], groups: FeatureGroups, *, steps: int = IG_STEPS,
                batch_size: int = 32) -> np.ndarray:
        """Integrated gradients of the mean calibrated risk, grouped into features (B, F).

        The baseline is all-zero static and visit tensors: every covariate at its centre and
        every lab missing, with the patient's own visit count. Rows sum to risk(x) - risk(baseline).
        """
        static, visits, lengths = _tensors(self.cfg, arrays)
        if len(groups.static) != static.shape[1] or len(groups.visit) != visits.shape[2]:
            raise ValueError("feature groups do not match the model's input widths; build them from its feature spec")
        w = torch.full((steps + 1,), 1.0 / steps)
        w[0] = w[-1] = 0.5 / steps  # trapezoid rule over alpha in [0, 1]
        alphas = torch.linspace(0.0, 1.0, steps + 1)
        A = steps + 1
        attr_s, attr_v = torch.zeros_like(static), torch.zeros_like(visits)
        for i in range(0, len(static), batch_size):
            s, v, l = static[i:i + batch_size], visits[i:i + batch_size], lengths[i:i + batch_size]
            B, T, V = v.shape
            ps = (alphas[:, None, None] * s[None]).reshape(A * B, -1).requires_grad_(True)  # (A*B, S)
            pv = (alphas[:, None, None, None] * v[None]).reshape(A * B, T, V).requires_grad_(True)  # (A*B, T, V)
            out = self._ensemble_risk(ps, pv, l.repeat(A))
            gs, gv = torch.autograd.grad(out.sum(), [ps, pv])  # rows are independent: per-row gradients
            gs = (w[:, None, None] * gs.reshape(A, B, -1)).sum(dim=0)  # (B, S), path-averaged
            gv = (w[:, None, None, None] * gv.reshape(A, B, T, V)).sum(dim=0)  # (B, T, V)
            attr_s[i:i + B], attr_v[i:i + B] = s * gs, v * gv
        out = np.zeros((len(static), len(groups.names)), dtype=np.float64)
        np.add.at(out.T, np.asarray(groups.static), attr_s.double().numpy().T)
        np.add.at(out.T, np.asarray(groups.visit), attr_v.double().sum(dim=1).numpy().T)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every member's weights, keyed member{i}.<name> (for safetensors)."""
        return {f"member{i}.{k}": v.detach().clone() for i, m in enumerate(self.models)
                for k, v in m.state_dict().items()}

    def meta(self) -> dict:
        """Everything but the weights, JSON-serialisable (for the manifest)."""
        return {"config": asdict(self.cfg), "members": self.members,
                "calibration": [{"scale": a, "shift": b} for a, b in self.calibration],
                "residual_sd": self.residual_sd, "risk_thresholds": list(self.thresholds),
                "tertiles": list(self.tertiles) if self.tertiles is not None else None,
                "categories": list(CATEGORIES), "arm_column": self.arm_column,
                "arm_shift": list(self.arm_shift) if self.arm_shift is not None else None}

    @classmethod
    def from_state(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "FusionEnsemble":
        """Rebuild an ensemble saved with `meta()` and `state_tensors()`."""
        cfg = FusionConfig(**meta["config"])
        models = []
        for i in range(int(meta["members"])):
            prefix = f"member{i}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not state:
                raise ValueError(f"weights of ensemble member {i} are missing; the model directory is incomplete")
            model = FusionPredictor(cfg)
            model.load_state_dict(state)
            models.append(model)
        tertiles = meta.get("tertiles")
        return cls(cfg, models, calibration=[(float(c["scale"]), float(c["shift"])) for c in meta["calibration"]],
                   residual_sd=float(meta.get("residual_sd", 0.0)),
                   tertiles=tuple(tertiles) if tertiles is not None else None,
                   thresholds=tuple(meta.get("risk_thresholds", RISK_THRESHOLDS)), arm_column=meta.get("arm_column"),
                   arm_shift=tuple(meta["arm_shift"]) if meta.get("arm_shift") is not None else None)


def train_ensemble(cfg: FusionConfig, train_arrays: dict[str, np.ndarray], val_arrays: dict[str, np.ndarray],
                   tcfg: TrainConfig, *, members: int = 5, dp: DPSettings | None = None,
                   on_step: Callable[[int, int], None] | None = None) -> tuple[FusionEnsemble, list[TrainResult]]:
    """Train `members` models from seeds tcfg.seed + i (each keeping its best validation epoch), then calibrate.

    With DP every member sees the same patients, so the privacy cost is the composition of
    all members' steps: calibrate the noise for members x steps (`ensemble_dp`) and charge
    `ensemble_history(results)`.
    """
    if members < 1:
        raise ValueError(f"members must be at least 1, got {members}")
    per_epoch = steps_per_epoch(len(train_arrays["static"]), tcfg.batch_size)
    total = members * tcfg.epochs * per_epoch
    has_val = len(val_arrays["static"]) > 0
    models, results = [], []
    for i in range(members):
        model = build_model(cfg, seed=tcfg.seed + i)
        best, best_state = float("inf"), None
        for epoch in range(tcfg.epochs):
            # one epoch per call, keeping the epoch with the best validation loss: deep
            # models overfit small trials within a few epochs. With DP every epoch's steps
            # are charged whichever is kept, so the accountant's bound still holds.
            offset = (i * tcfg.epochs + epoch) * per_epoch
            report = None if on_step is None else (lambda d, _t, o=offset: on_step(o + d, total))
            results.append(train(model, train_arrays, replace(tcfg, epochs=1, seed=tcfg.seed + i + 7919 * epoch),
                                 dp=dp, on_step=report))
            if has_val:
                loss = mean_loss(model, val_arrays)
                if loss < best:
                    best, best_state = loss, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if best_state is not None:
            model.load_state_dict(best_state)
        models.append(model)
    ensemble = FusionEnsemble(cfg, models)
    if has_val:
        ensemble.calibrate(val_arrays)
    return ensemble, results


def ensemble_history(results: list[TrainResult]) -> list[tuple[float, float, int]]:
    """The accountant history of a whole ensemble: every member's steps, composed."""
    return [h for r in results for h in r.history]


def ensemble_dp(n: int, tcfg: TrainConfig, *, members: int, target_epsilon: float, delta: float,
                max_grad_norm: float, grad_sample_mode: str = "hooks",
                prior: list[tuple[float, float, int]] | None = None) -> DPSettings:
    """DP settings whose noise makes all members' training together spend `target_epsilon` (with `prior`)."""
    return budgeted_dp(n, tcfg, runs=members, target_epsilon=target_epsilon, delta=delta,
                       max_grad_norm=max_grad_norm, grad_sample_mode=grad_sample_mode, prior=prior)
