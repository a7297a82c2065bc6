"""One training loop for every model, with and without differential privacy.

`fit` runs the same optimiser, the same batches and the same loss with or without DP;
with `dp` set, Opacus wraps the model for per-sample gradients (hooks, or ghost clipping
where every layer has a norm sampler), samples batches by Poisson sampling and adds
calibrated noise. The returned history is exactly what the accountant needs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

LossFn = Callable[[nn.Module, list[torch.Tensor]], torch.Tensor]
GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by plain and private training."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    # FedProx: after every step, a proximal step pulls the weights toward the ones training
    # started from (the global model): w -= lr * mu * (w - w_start). It uses no data, so with
    # DP it is post-processing of the private step and costs no privacy.
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD parameters; the noise comes from the privacy accountant, never a default."""

    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str = "hooks"

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and self.max_grad_norm > 0):
            raise ValueError(f"noise_multiplier and max_grad_norm must be positive, got "
                             f"{self.noise_multiplier} and {self.max_grad_norm}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}")


@dataclass(frozen=True)
class TrainResult:
    """What one training call did; for DP runs, what the accountant must be charged."""

    loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float  # 0.0 without DP
    examples: int

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Opacus accountant history: [(noise_multiplier, sample_rate, steps)], empty without DP."""
        return [(self.noise_multiplier, self.sample_rate, self.steps)] if self.noise_multiplier > 0 else []


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch; Opacus samples each example with rate 1/this (Poisson)."""
    return max(1, math.ceil(n / batch_size))


def budgeted_dp(n: int, cfg: TrainConfig, *, target_epsilon: float, delta: float, max_grad_norm: float,
                runs: int = 1, grad_sample_mode: str = "hooks",
                prior: list[tuple[float, float, int]] | None = None) -> DPSettings:
    """DP settings whose noise makes `runs` trainings of `cfg` on n examples spend `target_epsilon`
    in total on top of `prior` (Opacus RDP accountant; Poisson rate 1 / steps per epoch, as `fit` samples)."""
    from evoclone.privacy.accounting import calibrate_noise

    per_epoch = steps_per_epoch(n, cfg.batch_size)
    sigma = calibrate_noise(prior=list(prior or []), target_epsilon=target_epsilon, delta=delta,
                            sample_rate=1.0 / per_epoch, steps=runs * cfg.epochs * per_epoch)
    return DPSettings(noise_multiplier=sigma, max_grad_norm=max_grad_norm, grad_sample_mode=grad_sample_mode)


def fit(model: nn.Module, dataset: Dataset, cfg: TrainConfig, *, loss_fn: LossFn,
        dp: DPSettings | None = None, on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train `model` in place; `loss_fn(module, batch)` returns the mean loss of a batch.

    With `dp`, the loss must be a mean of per-example terms (no batch statistics), which
    is what makes per-sample clipping bound each example's influence. `on_step(done,
    total)` reports progress.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("no training examples; check the data and the endpoint columns")
    torch.manual_seed(cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    if dp is None:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        model.train()
        loss, steps = _loop(model, loader, opt, cfg, loss_fn, on_step, private=False)
        model.eval()
        return TrainResult(loss=loss, steps=steps, sample_rate=cfg.batch_size / n if n else 0.0,
                           noise_multiplier=0.0, examples=n)
    return _fit_private(model, loader, cfg, loss_fn=loss_fn, dp=dp, on_step=on_step, n=n)


def _fit_private(model: nn.Module, loader: DataLoader, cfg: TrainConfig, *, loss_fn: LossFn,
                 dp: DPSettings, on_step, n: int) -> TrainResult:
    from opacus import PrivacyEngine  # imported here: inference-only processes skip its cost
    from opacus.validators import ModuleValidator

    from .dp_layers import fuse_clipping, register_grad_samplers, use_output_hooks

    register_grad_samplers()
    model.train()  # Opacus validates (and needs) training mode
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model cannot be trained with DP-SGD: {errors[0]}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    with warnings.catch_warnings():
        # benign and noisy in site logs: Opacus's note that its CSPRNG is off (the noise
        # generator is seeded for reproducibility), and torch's note that backward hooks
        # fire although inputs need no gradient
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message=".*Using a non-full backward hook.*")
        engine = PrivacyEngine(accountant="rdp")
        kwargs = {}
        if dp.grad_sample_mode == "ghost":
            # ghost clipping needs the per-example losses: the criterion is reduced by Opacus
            kwargs["criterion"] = _PerExample()
        made = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm, poisson_sampling=True, grad_sample_mode=dp.grad_sample_mode,
            noise_generator=torch.Generator(device=_device(model)).manual_seed(cfg.seed + 1), **kwargs)
        # ghost clipping also returns the loss wrapper that runs its two backward passes
        private, opt, criterion, dp_loader = made if len(made) == 4 else (made[0], made[1], None, made[2])
        # hooks mode: clip and noise every parameter as one flat vector (same result, far
        # fewer kernel launches; benchmarks/bench_twin_gpt.py measures it)
        fuse_clipping(opt)
        use_output_hooks(private)
        private.train()
        loss, _ = _loop(private, dp_loader, opt, cfg, loss_fn, on_step, private=True, criterion=criterion)
    steps = sum(s for _, _, s in engine.accountant.history)
    sample_rate = engine.accountant.history[-1][1] if engine.accountant.history else 0.0
    private.remove_hooks()  # every Opacus wrapper (hooks, ghost) has them
    for p in model.parameters():
        p.grad_sample = None
        p.grad = None
    model.eval()
    return TrainResult(loss=loss, steps=steps, sample_rate=sample_rate,
                       noise_multiplier=dp.noise_multiplier, examples=n)


class _PerExample(nn.Module):
    """Criterion for ghost clipping: the model's loss_fn already returns per-example losses."""

    reduction = "mean"

    def forward(self, per_example: torch.Tensor, _target=None) -> torch.Tensor:
        return per_example


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _loop(model, loader, opt, cfg: TrainConfig, loss_fn: LossFn, on_step, *, private: bool,
          criterion=None) -> tuple[float, int]:
    total_steps = cfg.epochs * len(loader)
    device = _device(model)
    done, total, count = 0, 0.0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else None
    for _ in range(cfg.epochs):
        for batch in loader:
            opt.zero_grad()
            batch = [t.to(device, non_blocking=True) for t in batch]
            b = len(batch[0])
            if b == 0:
                # an empty Poisson batch still releases a (pure noise) step, as the
                # accountant assumes; Opacus clips nothing and adds the noise
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                opt.step()
            else:
                if criterion is not None:
                    loss = criterion(loss_fn(model, batch, reduction="none"), None)
                else:
                    loss = loss_fn(model, batch)
                loss.backward()
                opt.step()
                total += loss.item() * b
                count += b
            if anchor is not None:
                with torch.no_grad():
                    for p, a in zip(params, anchor):
                        p.add_(p - a, alpha=-cfg.lr * cfg.proximal_mu)
            done += 1
            if on_step is not None:
                on_step(done, total_steps)
    return total / max(count, 1), done
