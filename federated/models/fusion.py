"""Fusion outcome predictor: Transformer + BiLSTM over visits, attention fusion, learned gate.

Every parameter lives in an `nn.Linear`, an `nn.LayerNorm` or the `BiLSTM` (which keeps
`nn.LSTM`'s parameter names), and Opacus has a per-sample gradient rule for each, so the
same module trains with and without DP-SGD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bilstm import BiLSTM

ENDPOINTS = ("time_to_event", "binary", "continuous")


@dataclass(frozen=True)
class FusionConfig:
    """Everything that defines the architecture; the weights file holds the rest."""

    static_dim: int
    visit_dim: int
    max_visits: int = 16
    d_model: int = 32
    n_heads: int = 2
    n_layers: int = 1
    dropout: float = 0.0
    endpoint: str = "time_to_event"
    time_bins: int = 8  # discrete-time hazard intervals over the horizon
    horizon_days: float = 1095.0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if self.d_model % self.n_heads or self.d_model % 2:
            raise ValueError("d_model must be even and divisible by n_heads")

    @property
    def out_dim(self) -> int:
        """Head width: one logit per time bin for time-to-event, else one."""
        return self.time_bins if self.endpoint == "time_to_event" else 1


class SelfAttentionBlock(nn.Module):
    """Pre-norm Transformer encoder block with key-padding mask."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.fc_out = nn.Linear(2 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.n_heads
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, h, C // h).transpose(1, 2)  # (B, h, T, C/h)
        k = k.view(B, T, h, C // h).transpose(1, 2)
        v = v.view(B, T, h, C // h).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // h)  # (B, h, T, T)
        att = att.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(dim=-1)
        y = (self.drop(att) @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(x)))))


class AttentionPool(nn.Module):
    """Pool a sequence into one vector with a query from the static embedding."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)

    def forward(self, seq: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        scores = (self.k(seq) @ self.q(query).unsqueeze(-1)).squeeze(-1) / math.sqrt(seq.shape[-1])  # (B, T)
        w = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return (w.unsqueeze(-1) * seq).sum(dim=1)  # (B, d)


class FusionPredictor(nn.Module):
    """Static MLP, Transformer and BiLSTM branches fused by attention, mixed by a learned gate."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.static = nn.Sequential(nn.Linear(cfg.static_dim, d), nn.GELU(), nn.Linear(d, d))
        self.visit_in = nn.Linear(cfg.visit_dim, d)
        self.blocks = nn.ModuleList(SelfAttentionBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_tx = nn.LayerNorm(d)
        self.lstm = BiLSTM(d, d // 2)
        self.pool_tx = AttentionPool(d)
        self.pool_rnn = AttentionPool(d)
        self.fuse_key = nn.Linear(d, d)
        self.fuse_score = nn.Linear(d, 1)
        self.gate = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, cfg.out_dim)
        # a linear prognostic term on the static covariates, shared by every time bin: few
        # parameters, so it learns fast even under DP noise; the deep branches add to it
        self.linear = nn.Linear(cfg.static_dim, 1, bias=False)
        nn.init.zeros_(self.linear.weight)
        if cfg.endpoint == "time_to_event":
            # start near a plausible per-interval hazard (~5%) instead of 50%, so the first
            # (noisy, under DP) steps are not spent learning the baseline
            nn.init.constant_(self.head.bias, -3.0)

    def encode(self, static: torch.Tensor, visits: torch.Tensor, lengths: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the fused representation (B, d) and the modality weights (B, 3)."""
        B, T, _ = visits.shape
        mask = torch.arange(T, device=visits.device)[None, :] < lengths[:, None]  # (B, T)
        s = self.static(static)  # (B, d)
        x = self.visit_in(visits)  # (B, T, d)
        tx = x
        for block in self.blocks:
            tx = block(tx, mask)
        tx = self.pool_tx(self.ln_tx(tx), mask, s)  # (B, d)
        rnn = self.pool_rnn(self.lstm(x, lengths), mask, s)  # (B, T, d) -> (B, d)
        modalities = torch.stack([s, tx, rnn], dim=1)  # (B, 3, d)
        w = self.fuse_score(torch.tanh(self.fuse_key(modalities))).squeeze(-1).softmax(dim=-1)  # (B, 3)
        fused = (w.unsqueeze(-1) * modalities).sum(dim=1)  # (B, d)
        g = torch.sigmoid(self.gate(torch.cat([s, fused], dim=-1)))  # (B, d)
        return g * fused + (1 - g) * s, w

    def forward(self, static: torch.Tensor, visits: torch.Tensor, lengths: torch.Tensor,
                targets: dict[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (logits (B, out_dim), mean loss or None)."""
        z, _ = self.encode(static, visits, lengths)
        logits = self.head(z) + self.linear(static)  # (B, out_dim) + (B, 1)
        loss = None if targets is None else endpoint_loss(self.cfg, logits, targets)
        return logits, loss


def bin_index(cfg: FusionConfig, time: torch.Tensor) -> torch.Tensor:
    """Index of the discrete-time interval each follow-up time falls in."""
    width = cfg.horizon_days / cfg.time_bins
    return torch.clamp((time / width).long(), max=cfg.time_bins - 1)


def discrete_hazard_nll(cfg: FusionConfig, logits: torch.Tensor, time: torch.Tensor,
                        event: torch.Tensor) -> torch.Tensor:
    """Per-patient negative log-likelihood of a discrete-time hazard model (B,).

    Unlike Cox's partial likelihood it is a sum over patients, so per-sample gradient
    clipping bounds each patient's influence and DP-SGD's guarantee holds. Follow-up past
    the horizon counts as censored at the horizon.
    """
    j = bin_index(cfg, time)  # (B,)
    k = torch.arange(cfg.time_bins, device=logits.device)[None, :]  # (1, K)
    observed = (event > 0.5) & (time < cfg.horizon_days)
    log_surv = F.logsigmoid(-logits)  # log(1 - h_k), (B, K)
    log_haz = F.logsigmoid(logits)  # log h_k
    survived = (k < j[:, None]).float()  # intervals fully survived
    ll = (survived * log_surv).sum(dim=1)
    at_j = log_haz.gather(1, j[:, None]).squeeze(1)
    surv_j = log_surv.gather(1, j[:, None]).squeeze(1)
    # censored within interval j: counts as surviving it unless censoring is in its first half
    width = cfg.horizon_days / cfg.time_bins
    late = (time - j.float() * width) >= width / 2
    ll = ll + torch.where(observed, at_j, torch.where(late, surv_j, torch.zeros_like(surv_j)))
    return -ll


def endpoint_loss(cfg: FusionConfig, logits: torch.Tensor, targets: dict[str, torch.Tensor],
                  reduction: str = "mean") -> torch.Tensor:
    """Loss for the configured endpoint: the batch mean, or per patient (B,) with reduction="none"."""
    if cfg.endpoint == "time_to_event":
        per = discrete_hazard_nll(cfg, logits, targets["time"], targets["event"])
    elif cfg.endpoint == "binary":
        per = F.binary_cross_entropy_with_logits(logits.squeeze(-1), targets["binary"], reduction="none")
    else:
        per = F.mse_loss(logits.squeeze(-1), targets["continuous"], reduction="none")
    if reduction == "none":
        return per
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per.mean()


def risk_score(cfg: FusionConfig, logits: torch.Tensor) -> torch.Tensor:
    """Higher means worse: cumulative hazard to the horizon, probability, or predicted value."""
    if cfg.endpoint == "time_to_event":
        return -F.logsigmoid(-logits).sum(dim=-1)
    if cfg.endpoint == "binary":
        return torch.sigmoid(logits.squeeze(-1))
    return logits.squeeze(-1)


def survival_curve(cfg: FusionConfig, logits: torch.Tensor) -> torch.Tensor:
    """Predicted survival at the end of each interval (B, K)."""
    return torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=-1))
