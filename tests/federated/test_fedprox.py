"""FedProx's proximal step in the one training loop (with and without DP)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from evoclone.federated.trainer import DPSettings, TrainConfig, fit


def _loss(module, batch, reduction="mean"):
    x, y = batch
    err = (module(x).squeeze(-1) - y) ** 2
    return err if reduction == "none" else err.mean()


def _drift(mu: float, dp: DPSettings | None) -> float:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    start = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    data = TensorDataset(x, x @ torch.tensor([3.0, -2.0, 1.0, 0.5]) + 4.0)
    fit(model, data, TrainConfig(epochs=3, batch_size=32, lr=0.05, seed=0, proximal_mu=mu), loss_fn=_loss, dp=dp)
    return float(sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start)).sqrt())


def test_proximal_term_keeps_local_weights_near_the_global_model():
    assert _drift(5.0, None) < 0.5 * _drift(0.0, None)
    dp = DPSettings(noise_multiplier=0.5, max_grad_norm=1.0)
    assert _drift(5.0, dp) < 0.5 * _drift(0.0, dp)
