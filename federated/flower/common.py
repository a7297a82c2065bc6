"""What the ServerApp and ClientApp share: reading tunables from the run config."""

from __future__ import annotations

from collections.abc import Mapping

from ..features import FeatureSpec
from ..models.fusion import FusionConfig, FusionPredictor
from ..training import DPSettings, TrainConfig, build_model

STATUS_OK = "ok"
STATUS_REFUSED = "refused"


def model_config(rc: Mapping) -> FusionConfig:
    """The predictor's architecture from the run config; input widths from the feature spec."""
    spec = FeatureSpec()
    return FusionConfig(static_dim=spec.static_dim, visit_dim=spec.visit_dim, max_visits=spec.max_visits,
                        d_model=int(rc["d-model"]), n_heads=int(rc["n-heads"]), n_layers=int(rc["n-layers"]),
                        endpoint=str(rc["endpoint"]), time_bins=int(rc["time-bins"]),
                        horizon_days=float(rc["horizon-days"]))


def new_model(rc: Mapping) -> FusionPredictor:
    """A predictor initialised from the run's seed (identical on every node)."""
    return build_model(model_config(rc), seed=int(rc["seed"]))


def train_config(rc: Mapping, *, seed_offset: int = 0) -> TrainConfig:
    """Local optimisation settings for one round."""
    return TrainConfig(epochs=int(rc["local-epochs"]), batch_size=int(rc["batch-size"]),
                       lr=float(rc["learning-rate"]), seed=int(rc["seed"]) + seed_offset)


def dp_settings(rc: Mapping, *, noise_multiplier: float) -> DPSettings:
    """DP-SGD settings: clipping and per-sample gradient mode from the run config, noise from the ledger."""
    return DPSettings(noise_multiplier=noise_multiplier, max_grad_norm=float(rc["max-grad-norm"]),
                      grad_sample_mode=str(rc["grad-sample-mode"]))
