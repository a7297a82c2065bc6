"""Local training of the fusion predictor: plain, and DP-SGD with Opacus."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .features import SPLITS
from .models.fusion import FusionConfig, FusionPredictor, endpoint_loss, risk_score

FIELDS = ("static", "visits", "lengths", "time", "event", "binary", "continuous")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by plain and private training."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class DPResult:
    """What one private training call did and spent."""

    loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    examples: int


def subset(arrays: dict[str, np.ndarray], split: str | None = None,
           endpoint: str = "time_to_event") -> dict[str, np.ndarray]:
    """Rows of one split (train/val/test, None for all) that have the endpoint observed."""
    keep = np.ones(len(arrays["static"]), dtype=bool)
    if split is not None:
        keep &= arrays["split"] == SPLITS[split]
    target = {"time_to_event": "time", "binary": "binary", "continuous": "continuous"}[endpoint]
    keep &= ~np.isnan(arrays[target])
    return {k: v[keep] for k, v in arrays.items()}


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Pool several snapshots' arrays (for the centralized baseline only)."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def to_dataset(arrays: dict[str, np.ndarray]) -> TensorDataset:
    """Tensors in FIELDS order; missing targets become 0 (they are never used by the loss)."""
    return TensorDataset(*(torch.from_numpy(np.nan_to_num(arrays[f])) for f in FIELDS))


def _batch_loss(model: FusionPredictor, batch: list[torch.Tensor]) -> torch.Tensor:
    static, visits, lengths, time, event, binary, continuous = batch
    _, loss = model(static, visits, lengths,
                    {"time": time, "event": event, "binary": binary, "continuous": continuous})
    return loss


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch; Opacus samples each example with rate 1/this (Poisson)."""
    return max(1, math.ceil(n / batch_size))


def train_plain(model: FusionPredictor, arrays: dict[str, np.ndarray], cfg: TrainConfig) -> float:
    """Non-private training (centralized or site-local baselines); returns the last epoch's loss."""
    torch.manual_seed(cfg.seed)
    loader = DataLoader(to_dataset(arrays), batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    last = float("nan")
    for _ in range(cfg.epochs):
        total, count = 0.0, 0
        for batch in loader:
            opt.zero_grad()
            loss = _batch_loss(model, batch)
            loss.backward()
            opt.step()
            total += loss.item() * len(batch[0])
            count += len(batch[0])
        last = total / max(count, 1)
    return last


def train_dp(model: FusionPredictor, arrays: dict[str, np.ndarray], cfg: TrainConfig, *,
             noise_multiplier: float, max_grad_norm: float) -> DPResult:
    """DP-SGD with Poisson sampling and per-sample clipping; the model is updated in place."""
    from opacus import PrivacyEngine  # imported here: evaluation-only processes skip its cost
    from opacus.validators import ModuleValidator

    if noise_multiplier <= 0 or max_grad_norm <= 0:
        raise ValueError("noise_multiplier and max_grad_norm must be positive")
    torch.manual_seed(cfg.seed)
    original = model
    model.train()  # Opacus validates (and needs) training mode
    model = ModuleValidator.fix(model)  # nn.LSTM -> DPLSTM with the same weights and names
    ModuleValidator.validate(model, strict=True)
    loader = DataLoader(to_dataset(arrays), batch_size=cfg.batch_size, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    with warnings.catch_warnings():
        # benign and noisy in site logs: Opacus's note that its CSPRNG is off (the noise
        # generator is seeded for reproducibility), and torch's note that backward hooks
        # fire although inputs need no gradient
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant="rdp")
        private, opt, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(cfg.seed + 1))
        private.train()
        total, count = 0.0, 0
        for _ in range(cfg.epochs):
            for batch in loader:
                opt.zero_grad()
                if len(batch[0]) == 0:
                    # an empty Poisson batch still releases a (pure noise) step, as the
                    # accountant assumes; Opacus clips nothing and adds the noise
                    for p in private.parameters():
                        if p.requires_grad:
                            p.grad_sample = torch.zeros((0, *p.shape))
                    opt.step()
                    continue
                loss = _batch_loss(private, batch)
                loss.backward()
                opt.step()
                total += loss.item() * len(batch[0])
                count += len(batch[0])
    steps = sum(n for _, _, n in engine.accountant.history)
    sample_rate = engine.accountant.history[-1][1] if engine.accountant.history else 0.0
    private.remove_hooks()
    trained = model.state_dict()  # DPLSTM lists its weights under both its own and nn.LSTM's names
    original.load_state_dict({k: trained[k] for k in original.state_dict()})
    return DPResult(loss=total / max(count, 1), steps=steps, sample_rate=sample_rate,
                    noise_multiplier=noise_multiplier, examples=len(arrays["static"]))


@torch.no_grad()
def predict_logits(model: FusionPredictor, arrays: dict[str, np.ndarray], batch_size: int = 512) -> np.ndarray:
    """Logits for every row, in order."""
    model.eval()
    out = []
    ds = to_dataset(arrays)
    for batch in DataLoader(ds, batch_size=batch_size):
        logits, _ = model(batch[0], batch[1], batch[2])
        out.append(logits)
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.out_dim), dtype=np.float32)


def predict_risk(model: FusionPredictor, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Risk score per row (higher is worse)."""
    logits = torch.from_numpy(predict_logits(model, arrays))
    return risk_score(model.cfg, logits).numpy()


@torch.no_grad()
def mean_loss(model: FusionPredictor, arrays: dict[str, np.ndarray]) -> float:
    """Mean endpoint loss over rows."""
    if len(arrays["static"]) == 0:
        return float("nan")
    logits = torch.from_numpy(predict_logits(model, arrays))
    t = {f: torch.from_numpy(np.nan_to_num(arrays[f])) for f in ("time", "event", "binary", "continuous")}
    return float(endpoint_loss(model.cfg, logits, t))


def build_model(cfg: FusionConfig, seed: int = 0) -> FusionPredictor:
    """A freshly initialised predictor; the seed makes every site start from the same weights."""
    torch.manual_seed(seed)
    return FusionPredictor(cfg)


def train_with_validation(model: FusionPredictor, train: dict[str, np.ndarray], val: dict[str, np.ndarray],
                          cfg: TrainConfig) -> int:
    """Non-private training for up to `cfg.epochs`, keeping the epoch with the best validation loss.

    Returns the chosen epoch (1-based). Used for the baselines so they are as strong as
    their data allows.
    """
    best, best_state, best_epoch = float("inf"), None, 0
    one = TrainConfig(epochs=1, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed)
    for epoch in range(1, cfg.epochs + 1):
        train_plain(model, train, TrainConfig(**{**one.__dict__, "seed": cfg.seed + epoch}))
        loss = mean_loss(model, val) if len(val["static"]) else -epoch
        if loss < best:
            best, best_epoch = loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return best_epoch
