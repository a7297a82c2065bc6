"""Local training of the fusion predictor, with and without DP-SGD, through `trainer.fit`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import trainer
from .features import SPLITS
from .models.fusion import FusionConfig, FusionPredictor, endpoint_loss, risk_score
from .trainer import DPSettings, TrainConfig, TrainResult, steps_per_epoch

__all__ = ["DPSettings", "FIELDS", "TrainConfig", "TrainResult", "build_model", "concat", "fusion_loss",
           "mean_loss", "predict_logits", "predict_risk", "steps_per_epoch", "subset", "to_dataset", "train",
           "train_with_validation"]

FIELDS = ("static", "visits", "lengths", "time", "event", "binary", "continuous")


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


def fusion_loss(cfg: FusionConfig) -> Callable[..., torch.Tensor]:
    """`trainer.fit`'s loss for a batch in FIELDS order: mean, or per patient with reduction="none"."""
    def loss_fn(module: nn.Module, batch: list[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        static, visits, lengths, time, event, binary, continuous = batch
        logits, _ = module(static, visits, lengths)  # module may be Opacus's wrapper: no .cfg there
        targets = {"time": time, "event": event, "binary": binary, "continuous": continuous}
        return endpoint_loss(cfg, logits, targets, reduction=reduction)
    return loss_fn


def train(model: FusionPredictor, arrays: dict[str, np.ndarray], cfg: TrainConfig, *,
          dp: DPSettings | None = None, on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train in place, privately when `dp` is given; the one code path for both."""
    if dp is not None and dp.grad_sample_mode == "functorch":
        raise ValueError("the fusion predictor trains with grad_sample_mode 'hooks' or 'ghost': its BiLSTM has its "
                         "own per-sample rule, and Opacus's functorch mode handles single-input layers only")
    return trainer.fit(model, to_dataset(arrays), cfg, loss_fn=fusion_loss(model.cfg), dp=dp, on_step=on_step)


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


def train_with_validation(model: FusionPredictor, train_arrays: dict[str, np.ndarray],
                          val_arrays: dict[str, np.ndarray], cfg: TrainConfig, *, dp: DPSettings | None = None,
                          check_every: int = 1) -> int:
    """Training for up to `cfg.epochs`, keeping the weights with the best validation loss.

    The validation loss is checked every `check_every` epochs; each such chunk starts a
    fresh optimizer (as a federated round does). Privately with `dp`, whose noise must be
    budgeted for all `cfg.epochs`. Returns the epoch (1-based) of the kept weights. Used for
    the baselines so they are as strong as their data (and privacy) allows.
    """
    best, best_state, best_epoch = float("inf"), None, 0
    chunk = replace(cfg, epochs=check_every)
    for n in range(1, cfg.epochs // check_every + 1):
        train(model, train_arrays, replace(chunk, seed=cfg.seed + n), dp=dp)
        epoch = n * check_every
        loss = mean_loss(model, val_arrays) if len(val_arrays["static"]) else -epoch
        if loss < best:
            best, best_epoch = loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return best_epoch
