"""Our Opacus rules give the same clipped gradients as brute force and as Opacus's own path."""

import copy
import warnings

import pytest
import torch
from opacus import PrivacyEngine
from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample
from opacus.grad_sample.linear import compute_linear_norm_sample
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from evoclone.federated import dp_layers as D
from evoclone.federated.models.twin_gpt import IGNORE, TwinGPT, TwinGPTConfig
from evoclone.federated.trainer import _PerExample


@pytest.mark.parametrize("T,i,o", [(50, 8, 8), (3, 16, 32), (20, 64, 64)])  # both norm routes
def test_linear_norm_rule_equals_brute_force_and_opacus(T, i, o):
    torch.manual_seed(0)
    lin = nn.Linear(i, o)
    a, g = torch.randn(4, T, i), torch.randn(4, T, o)
    new = D._linear_norm_sample(lin, [a], g)
    brute = torch.einsum("nto,nti->noi", g, a).flatten(1).norm(dim=1)
    assert torch.allclose(new[lin.weight], brute, rtol=1e-4)
    assert torch.allclose(new[lin.bias], g.sum(1).norm(dim=1), rtol=1e-4)
    assert torch.allclose(compute_linear_norm_sample(lin, [a], g)[lin.weight], brute, rtol=1e-4)
    a2, g2 = torch.randn(5, i), torch.randn(5, o)
    assert torch.allclose(D._linear_norm_sample(lin, [a2], g2)[lin.weight],
                          compute_linear_norm_sample(lin, [a2], g2)[lin.weight], rtol=1e-4)


@pytest.mark.parametrize("pad", [None, 0])
def test_embedding_norm_rule_equals_brute_force(pad):
    torch.manual_seed(1)
    emb = nn.Embedding(30, 6, padding_idx=pad)
    ids, g = torch.randint(0, 30, (4, 40)), torch.randn(4, 40, 6)
    new = D._embedding_norm_sample(emb, [ids], g)[emb.weight]
    brute = torch.stack([torch.zeros(30, 6).index_add(0, ids[n], g[n]) for n in range(4)])
    if pad is not None:
        brute[:, pad] = 0
    assert torch.allclose(new, brute.flatten(1).norm(dim=1), rtol=1e-4)
    if pad is None:
        assert torch.allclose(new, compute_embedding_norm_sample(emb, [ids], g)[emb.weight], rtol=1e-4)


def _setup(mode, *, noise, fused):
    torch.manual_seed(2)
    base = TwinGPT(TwinGPTConfig(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    ids = torch.randint(3, 40, (8, 24))
    mask = torch.ones_like(ids)
    mask[:4, 18:] = 0
    ds = TensorDataset(ids, mask)
    m = copy.deepcopy(base).train()
    D.register_grad_samplers()
    kw = {"criterion": _PerExample()} if mode == "ghost" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = PrivacyEngine().make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.0),
                                            data_loader=DataLoader(ds, batch_size=8), noise_multiplier=noise,
                                            max_grad_norm=0.05, poisson_sampling=False, grad_sample_mode=mode, **kw)
    if fused:
        assert D.fuse_clipping(made[1])
    return m, made, (ids, mask)


def _step(made, mode, batch):
    module, opt = made[0], made[1]
    ids, mask = batch
    opt.zero_grad()
    per = module(ids, ids.masked_fill(mask == 0, IGNORE), mask, reduction="none")[1]
    loss = made[2](per, None) if mode == "ghost" else per.mean()
    loss.backward()
    opt.step()


def test_ghost_and_fused_clipping_match_stock_opacus_hooks():
    grads = {}
    for mode, fused in (("hooks", False), ("ghost", False), ("hooks", True)):
        m, made, batch = _setup(mode, noise=0.0, fused=fused)
        for _ in range(2):  # twice: flags and zero_grad survive a step
            _step(made, mode, batch)
        grads[(mode, fused)] = [p.grad.clone() for p in m.parameters()]
    ref = grads[("hooks", False)]
    for key in (("ghost", False), ("hooks", True)):
        err = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads[key], ref))
        assert err < 1e-4, key


def test_fused_clipping_noise_has_the_calibrated_scale():
    m0, made0, batch = _setup("hooks", noise=0.0, fused=True)
    _step(made0, "hooks", batch)
    clean = [p.grad.clone() for p in m0.parameters()]
    m, made, batch = _setup("hooks", noise=2.0, fused=True)
    _step(made, "hooks", batch)
    noise = torch.cat([(p.grad - g).reshape(-1) for p, g in zip(m.parameters(), clean)])
    expected = 2.0 * 0.05 / made[1].expected_batch_size
    assert abs(noise.std().item() / expected - 1) < 0.05 and abs(noise.mean().item()) < expected * 0.05
    assert not D.fuse_clipping(torch.optim.SGD(m.parameters(), lr=0.1))  # only Opacus's hooks optimizer


def _brute_clipped_mean(model, loss_of, examples, clip):
    """Mean over examples of each example's own gradient clipped to `clip` (what DP-SGD must compute)."""
    total = None
    for ex in examples:
        model.zero_grad()
        loss_of(model, ex).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        g = g * min(1.0, clip / (g.norm().item() + 1e-6))
        total = g if total is None else total + g
    return total / len(examples)


@pytest.mark.parametrize("kind", ["gpt", "fusion"])
def test_output_hooks_give_each_example_its_own_clipped_gradient(kind):
    from evoclone.federated.features import FeatureSpec
    from evoclone.federated.models.fusion import FusionConfig
    from evoclone.federated.training import build_model, fusion_loss

    torch.manual_seed(3)
    if kind == "gpt":
        model = TwinGPT(TwinGPTConfig(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2))
        ids = torch.randint(3, 40, (6, 20))
        mask = torch.ones_like(ids)
        mask[:3, 15:] = 0
        tensors = [ids, mask]

        def loss_of(m, batch, reduction="mean"):
            i, k = batch
            return m(i, i.masked_fill(k == 0, IGNORE), k, reduction=reduction)[1]
    else:
        spec = FeatureSpec()
        model = build_model(FusionConfig(static_dim=spec.static_dim, visit_dim=spec.visit_dim, d_model=16))
        n = 6
        tensors = [torch.randn(n, spec.static_dim), torch.randn(n, 16, spec.visit_dim), torch.tensor([1, 3, 16, 8, 2, 5]),
                   torch.rand(n) * 1000, (torch.rand(n) < 0.5).float(), torch.zeros(n), torch.zeros(n)]
        loss_of = fusion_loss(model.cfg)
    clip = 0.05
    examples = [[t[i:i + 1] for t in tensors] for i in range(len(tensors[0]))]
    expected = _brute_clipped_mean(copy.deepcopy(model).train(), loss_of, examples, clip)
    m = copy.deepcopy(model).train()
    D.register_grad_samplers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, opt, _ = PrivacyEngine().make_private(
            module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.0),
            data_loader=DataLoader(TensorDataset(*tensors), batch_size=len(tensors[0])), noise_multiplier=0.0,
            max_grad_norm=clip, poisson_sampling=False)
    D.fuse_clipping(opt)
    D.use_output_hooks(private)  # what trainer.fit does in hooks mode
    for _ in range(2):  # the second step must not carry the first one's per-sample gradients
        opt.zero_grad()
        loss_of(private, tensors).backward()
        opt.step()
        got = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
