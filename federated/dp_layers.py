"""Per-sample gradient rules Opacus lacks for the layers our models use.

GPT-2 in `transformers` keeps its projections in `Conv1D`, a linear layer with the
weight stored transposed (in, out). Opacus has no rule for it and would fall back to
functorch, which re-runs each layer per example; these rules reuse Opacus's own
linear-layer einsums instead (per-sample gradients for the hooks mode, per-sample norms
for ghost clipping).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample
from opacus.grad_sample.utils import GradSampleModule
from transformers.pytorch_utils import Conv1D


class _AsLinear:
    """A view of a Conv1D with Linear's parameter layout, for Opacus's linear rules."""

    def __init__(self, layer: Conv1D) -> None:
        self.weight = layer.weight
        self.bias = layer.bias


def _conv1d_grad_sample(layer: Conv1D, activations: list[torch.Tensor], backprops: torch.Tensor
                        ) -> dict[torch.nn.Parameter, torch.Tensor]:
    out = compute_linear_grad_sample(_AsLinear(layer), activations, backprops)  # weight: (n, out, in)
    if layer.weight in out:
        out[layer.weight] = out[layer.weight].transpose(1, 2)  # (n, in, out), Conv1D's layout
    return out


def _conv1d_norm_sample(layer: Conv1D, activations: list[torch.Tensor], backprops: torch.Tensor
                        ) -> dict[torch.nn.Parameter, torch.Tensor]:
    return compute_linear_norm_sample(_AsLinear(layer), activations, backprops)  # norms ignore layout


def register_grad_samplers() -> None:
    """Register the Conv1D rules with Opacus (idempotent)."""
    if Conv1D not in GradSampleModule.GRAD_SAMPLERS:
        register_grad_sampler(Conv1D)(_conv1d_grad_sample)
        register_norm_sampler(Conv1D)(_conv1d_norm_sample)
