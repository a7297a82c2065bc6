"""Per-sample gradient rules Opacus lacks for the layers our models use, and faster norm rules.

GPT-2 in `transformers` keeps its projections in `Conv1D`, a linear layer with the
weight stored transposed (in, out). Opacus has no rule for it and would fall back to
functorch, which re-runs each layer per example; these rules reuse Opacus's own
linear-layer einsums instead (per-sample gradients for the hooks mode, per-sample norms
for ghost clipping).

Ghost clipping's norm rules are replaced for Conv1D, Linear and Embedding: Opacus always
takes a linear layer's norm through (T, T) Gram matrices, which costs n T^2 (in + out)
and is the slower route once a sequence is longer than about in*out/(in+out) tokens (a
365-token timeline through a 64-wide GPT: 8x the work); it also recomputes the Gram
matrix for the bias, whose norm is just that of the time-summed gradient. Its embedding
rule sorts (example, token) pairs with `torch.unique`. The rules here pick the cheaper
route per call and give the same norms (benchmarks/bench_twin_gpt.py measures the gain).

`fuse_clipping` makes an Opacus DPOptimizer (hooks mode) clip, sum, noise and scale all
parameters as one flat vector instead of a dozen small kernels per parameter; on a GPU,
where a small GPT's step is launch-bound, those per-parameter kernels are much of the
DP overhead. The noise is the same i.i.d. Gaussian per coordinate.
"""

from __future__ import annotations

import types

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.grad_sample.utils import GradSampleModule
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _generate_noise, _mark_as_processed
from torch import nn
from transformers.pytorch_utils import Conv1D

DENSE_EMBEDDING_LIMIT = 2 ** 25  # most elements of an (n, vocab, dim) per-sample embedding gradient


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


def _weight_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example Frobenius norm of sum_t a_t g_t^T, for a (n, T, in) and g (n, T, out) -> (n,)."""
    n, T, i = a.shape
    o = g.shape[-1]
    if T * (i + o) < i * o:  # short sequences: Gram matrices, n T^2 (in + out)
        gram = torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))  # (n, T, T)
        return gram.sum(dim=(1, 2)).clamp(min=0).sqrt()
    return torch.bmm(a.transpose(1, 2), g).flatten(1).norm(dim=1)  # the gradients, (n, in, out): n T in out


def _linear_norm_sample(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
                        ) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a linear layer (Linear or Conv1D: norms ignore the layout)."""
    g = backprops
    n = g.shape[0]
    a = activations[0].to(g.dtype).reshape(n, -1, activations[0].shape[-1])  # (n, T, in)
    g = g.reshape(n, -1, g.shape[-1])  # (n, T, out)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = _weight_norms(a, g)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=1).norm(dim=1)
    return out


def _embedding_norm_sample(layer: nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor
                           ) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of an embedding: dense per-example gradients when they are small."""
    ids = activations[0]
    n, V, d = backprops.shape[0], layer.num_embeddings, backprops.shape[-1]
    if n * V * d > DENSE_EMBEDDING_LIMIT:
        return compute_embedding_norm_sample(layer, activations, backprops)
    ids = ids.reshape(n, -1, 1).expand(-1, -1, d)  # (n, T, d)
    grads = torch.zeros((n, V, d), device=backprops.device, dtype=backprops.dtype)
    grads.scatter_add_(1, ids, backprops.reshape(n, -1, d))  # (n, V, d): each example's gradient
    if layer.padding_idx is not None:
        grads[:, layer.padding_idx] = 0  # torch never updates the padding row
    return {layer.weight: grads.flatten(1).norm(dim=1)}


def register_grad_samplers() -> None:
    """Register the Conv1D rules and the faster norm rules with Opacus (idempotent)."""
    if Conv1D not in GradSampleModule.GRAD_SAMPLERS:
        register_grad_sampler(Conv1D)(_conv1d_grad_sample)
    norms = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    for cls, rule in ((Conv1D, _linear_norm_sample), (nn.Linear, _linear_norm_sample),
                      (nn.Embedding, _embedding_norm_sample)):
        if norms.get(cls) is not rule:
            register_norm_sampler(cls)(rule)


def _fused_clip_and_accumulate(self: DPOptimizer) -> None:
    """Per-sample clipping and summing over one (n, P) matrix; adds to p.summed_grad like Opacus."""
    params = self.params
    samples = self.grad_samples  # each (n, *p.shape)
    n = len(samples[0])
    for p in params:
        _check_processed_flag(p.grad_sample)
    if n == 0:
        summed = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=params[0].dtype)
    else:
        flat = torch.cat([g.reshape(n, -1).to(params[0].dtype) for g in samples], dim=1)  # (n, P)
        factor = (self.max_grad_norm / (flat.norm(2, dim=1) + 1e-6)).clamp(max=1.0)  # (n,), as Opacus
        summed = factor @ flat  # (P,)
    for p, chunk in zip(params, summed.split([p.numel() for p in params])):
        chunk = chunk.view_as(p)
        p.summed_grad = chunk if p.summed_grad is None else p.summed_grad + chunk
        _mark_as_processed(p.grad_sample)


def _fused_add_noise(self: DPOptimizer) -> None:
    """One Gaussian draw over all coordinates, then the mean-reduction scale; writes p.grad."""
    params = self.params
    for p in params:
        _check_processed_flag(p.summed_grad)
    flat = torch.cat([p.summed_grad.reshape(-1) for p in params])  # (P,)
    flat = flat + _generate_noise(std=self.noise_multiplier * self.max_grad_norm, reference=flat,
                                  generator=self.generator, secure_mode=self.secure_mode)
    if self.loss_reduction == "mean":
        flat /= self.expected_batch_size * self.accumulated_iterations
    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
        p.grad = chunk.view_as(p)
        _mark_as_processed(p.summed_grad)


def fuse_clipping(optimizer) -> bool:
    """Make a hooks-mode Opacus DPOptimizer clip and noise all parameters at once; False if not one."""
    if type(optimizer) is not DPOptimizer:  # ghost clipping and distributed optimizers clip differently
        return False
    optimizer.clip_and_accumulate = types.MethodType(_fused_clip_and_accumulate, optimizer)
    optimizer.add_noise = types.MethodType(_fused_add_noise, optimizer)
    optimizer.scale_grad = types.MethodType(lambda self: None, optimizer)  # done in add_noise
    return True


def use_output_hooks(gsm) -> None:
    """Make a hooks-mode GradSampleModule take per-sample gradients from each layer's output.

    Opacus's `register_full_backward_hook` wraps every layer's inputs and outputs in extra
    autograd nodes and forces gradients for inputs nobody needs, and its bookkeeping
    allocates and copies a padded per-sample buffer per parameter per step. A hook on the
    output tensor receives the same gradient (Opacus's backprops) and hands it straight to
    the layer's Opacus rule; the result becomes `p.grad_sample` (summed if a layer runs
    twice in one forward). Layers whose rule needs their own backward to have run first
    (`needs_full_backward_hook`, the BiLSTM) keep Opacus's hooks.
    """
    from functools import partial

    from opacus.grad_sample.grad_sample_module import GradSampleModule

    if type(gsm) is not GradSampleModule:
        return
    handles = gsm._module.autograd_grad_sample_hooks
    for h in handles:
        h.remove()
    handles.clear()
    for module in gsm.iterate_submodules(gsm._module):
        if getattr(module, "needs_full_backward_hook", False):
            handles.append(module.register_forward_hook(gsm.capture_activations_hook))
            handles.append(module.register_full_backward_hook(partial(
                gsm.capture_backprops_hook, loss_reduction=gsm.loss_reduction, batch_first=gsm.batch_first)))
        else:
            rule = GradSampleModule.GRAD_SAMPLERS.get(type(module))
            if rule is None:
                raise ValueError(f"no per-sample gradient rule for {type(module).__name__}; register one in dp_layers")
            handles.append(module.register_forward_hook(partial(_output_hook, gsm, rule)))
    gsm.enable_hooks()


def _output_hook(gsm, rule, module, inputs, output) -> None:
    if not (gsm.hooks_enabled and module.training and torch.is_grad_enabled()):
        return
    if not (isinstance(output, torch.Tensor) and output.requires_grad):
        return
    activations = [t.detach() for t in inputs]

    def on_grad(g: torch.Tensor) -> None:
        backprops = g.detach()
        if gsm.loss_reduction == "mean":
            backprops = backprops * backprops.shape[0]  # the optimizer divides by the batch size again
        for p, gs in rule(module, activations, backprops).items():
            if p.requires_grad:
                p.grad_sample = gs if p.grad_sample is None else p.grad_sample + gs

    output.register_hook(on_grad)
