"""GPT twin generator: shapes, masks, KV cache, constrained sampling and (DP) training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from evoclone.federated.generation import SamplingConfig, sample, sequence_nlls
from evoclone.federated.generator_training import (
    build_generator,
    encode_records,
    perplexity,
    to_dataset,
    train_generator,
)
from evoclone.federated.grammar import FutureGrammar, is_well_formed
from evoclone.federated.models.twin_gpt import IGNORE, TwinGPT, TwinGPTConfig, positions, sequence_nll
from evoclone.federated.record import Arm
from evoclone.federated.simulator import cohort_records, simulate_cohort
from evoclone.federated.tokenizer import EventTokenizer
from evoclone.federated.trainer import DPSettings, TrainConfig
from evoclone.privacy.accounting import epsilon_of

TINY = {"size": "small", "n_embd": 16, "n_layer": 1, "n_head": 2}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def records():
    return cohort_records(simulate_cohort(patients=120, sites=2, seed=5))


@pytest.fixture(scope="module")
def tok(records) -> EventTokenizer:
    return EventTokenizer.fit(records, covariates=["age", "sex", "bmi", "genotype", "diabetes", "ckd"])


@pytest.fixture(scope="module")
def seqs(tok, records) -> list[list[int]]:
    s, info = encode_records(tok, records[:40])
    assert info["truncated"] == 0 and info["without_arm"] == 0
    return s


def _model(vocab: int = 30, n_positions: int = 64, seed: int = 0) -> TwinGPT:
    torch.manual_seed(seed)
    return TwinGPT(TwinGPTConfig(vocab_size=vocab, n_positions=n_positions, **TINY)).eval()


def test_config_presets_and_validation():
    cfg = TwinGPTConfig(vocab_size=50, size="medium")
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head) == (128, 4, 4)
    assert TwinGPTConfig(vocab_size=50, **TINY).n_embd == 16
    with pytest.raises(ValueError, match="size"):
        TwinGPTConfig(vocab_size=50, size="huge")
    with pytest.raises(ValueError, match="divisible"):
        TwinGPTConfig(vocab_size=50, n_embd=15, n_head=2)
    with pytest.raises(ValueError, match="too small"):
        TwinGPTConfig(vocab_size=4)


def test_untied_embeddings_and_shapes():
    m = _model()
    assert m.lm.lm_head.weight.data_ptr() != m.lm.transformer.wte.weight.data_ptr()
    ids = torch.randint(3, 30, (3, 10))
    logits, loss = m(ids)
    assert logits.shape == (3, 10, 30) and loss is None
    logits, loss = m(ids, ids)
    assert loss.shape == () and torch.isfinite(loss)
    _, per = m(ids, ids, reduction="none")
    assert per.shape == (3,)
    assert torch.allclose(per.mean(), loss)


def test_loss_is_a_per_patient_mean_that_ignores_padding():
    m = _model()
    torch.manual_seed(1)
    a, b = torch.randint(3, 30, (7,)), torch.randint(3, 30, (4,))
    ids = torch.zeros((2, 7), dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = a, 1
    ids[1, :4], mask[1, :4] = b, 1
    targets = ids.masked_fill(mask == 0, IGNORE)
    _, per = m(ids, targets, mask, reduction="none")
    # changing what sits in the padding changes nothing
    ids2 = ids.clone()
    ids2[1, 4:] = torch.tensor([5, 6, 7])
    _, per2 = m(ids2, targets, mask, reduction="none")
    assert torch.equal(per, per2)
    # each row equals its sequence alone: the mean NLL over its own next tokens
    for row, seq in ((0, a), (1, b)):
        logits, alone = m(seq[None], seq[None], reduction="none")
        manual = torch.nn.functional.cross_entropy(logits[0, :-1], seq[1:])
        assert torch.allclose(per[row], alone[0], atol=1e-6) and torch.allclose(alone[0], manual, atol=1e-6)
    # and the batch loss weights patients equally, however long they are
    assert torch.allclose(m(ids, targets, mask)[1], per.mean())
    assert torch.allclose(sequence_nll(torch.zeros(1, 3, 8), torch.full((1, 3), IGNORE)), torch.tensor(0.0))


def test_positions_are_batch_expanded_and_count_only_real_tokens():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    assert positions(mask).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 1, 2]]
    m = _model()
    seen = []
    hook = m.lm.transformer.wpe.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    try:
        m(torch.randint(3, 30, (3, 4)), attention_mask=mask)
        _, cache = m.step(torch.randint(3, 30, (3, 4)), mask)
        m.step(torch.randint(3, 30, (3, 1)), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1), cache)
    finally:
        hook.remove()
    # (B, T) ids reach the position embedding: Opacus's per-sample hook needs the batch dimension
    assert [tuple(p.shape) for p in seen] == [(3, 4), (3, 4), (3, 1)]
    assert seen[0].tolist() == positions(mask).tolist() and seen[2].tolist() == [[4], [2], [3]]


def test_kv_cache_steps_match_a_full_forward_with_left_padding():
    m = _model()
    torch.manual_seed(2)
    B, L = 3, 12
    ids = torch.randint(3, 30, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        full, _ = m(ids, attention_mask=mask)
        logits, cache = m.step(ids[:, :8], mask[:, :8])
        assert torch.allclose(logits, full[:, 7], atol=1e-5)
        for t in range(8, L):
            logits, cache = m.step(ids[:, t:t + 1], mask[:, :t + 1], cache)
            assert torch.allclose(logits, full[:, t], atol=1e-5)
        # left padding is invisible: a padded row equals its sequence run alone
        alone, _ = m(ids[2:3, 7:])
    assert torch.allclose(alone[0], full[2, 7:], atol=1e-5)


def _prompts(tok, records, n=6):
    return [tok.encode(r, arm=arm, with_future=False).ids for r in records[40:40 + n] for arm in Arm]


def test_untrained_model_samples_only_well_formed_futures_with_and_without_cache(tok, records):
    m = build_generator(tok, **TINY)
    prompts = _prompts(tok, records)
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    cfg = SamplingConfig(max_new=40, batch_size=5, top_p=0.9, seed=3)
    cached = sample(m, tok, prompts, cfg)
    plain = sample(m, tok, prompts, SamplingConfig(max_new=40, batch_size=5, top_p=0.9, seed=3, use_cache=False))
    assert cached == plain
    assert len(cached) == len(prompts)
    for fut in cached:
        assert len(fut) <= 40 and fut[-1] == tok.eos_id
        assert is_well_formed(tok, fut, 40) == (True, "")
        dec = tok.decode_future(fut[:-1])
        assert dec.status in ("event", "end")  # censoring is not generated unless asked for
    assert sample(m, tok, prompts, cfg) == cached  # the seed makes sampling reproducible
    assert sample(m, tok, prompts, SamplingConfig(max_new=40, batch_size=5, top_p=0.9, seed=4)) != cached


def test_tiny_top_p_is_greedy_over_the_allowed_tokens(tok, records):
    m = build_generator(tok, **TINY, seed=1)
    prompts = _prompts(tok, records, n=1)
    got = sample(m, tok, prompts, SamplingConfig(max_new=30, top_p=1e-9, seed=0))
    for p, fut in zip(prompts, got):
        g = FutureGrammar(tok, max_new=30)
        ids, want = list(p), []
        with torch.no_grad():
            while g.phase != "done":
                logits = m(torch.tensor([ids]))[0][0, -1].numpy()
                t = int(np.argmax(np.where(g.allowed(), logits, -np.inf)))
                g.advance(t)
                ids.append(t)
                want.append(t)
        assert fut == want


def test_sampling_refuses_bad_settings_and_prompts_without_room(tok, records):
    for bad in ({"temperature": 0}, {"top_p": 0}, {"top_p": 1.5}, {"max_new": 2}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    p = _prompts(tok, records, n=1)[0]
    small = TwinGPT(TwinGPTConfig(vocab_size=tok.vocab_size, n_positions=len(p) + 2, **TINY))
    with pytest.raises(ValueError, match="leaves no room"):
        sample(small, tok, [p], SamplingConfig())
    with pytest.raises(ValueError, match="one entry per prompt"):
        sample(build_generator(tok, **TINY), tok, [p], SamplingConfig(), constraints=[])


def test_training_lowers_perplexity(tok, seqs):
    m = build_generator(tok, **TINY)
    before = perplexity(m, seqs, pad_id=tok.pad_id)
    assert math.isfinite(before) and before > 1
    steps = []
    res = train_generator(m, tok, seqs, TrainConfig(epochs=3, batch_size=8, lr=1e-2),
                          on_step=lambda done, total: steps.append((done, total)))
    assert res.history == [] and res.steps == 15 and steps[-1] == (15, 15)
    after = perplexity(m, seqs, pad_id=tok.pad_id)
    assert after < 0.7 * before
    nll = sequence_nlls(m, seqs[:5], pad_id=tok.pad_id, batch_size=2)
    assert nll.shape == (5,) and np.allclose(np.exp(nll.mean()), perplexity(m, seqs[:5], pad_id=tok.pad_id),
                                             rtol=1e-5)
    assert np.isnan(perplexity(m, [], pad_id=tok.pad_id))


def test_dp_training_reports_what_the_opacus_accountant_needs(tok, seqs, records):
    m = build_generator(tok, **TINY)
    before = [p.detach().clone() for p in m.parameters()]
    dp = DPSettings(noise_multiplier=1.1, max_grad_norm=1.0)
    res = train_generator(m, tok, seqs, TrainConfig(epochs=2, batch_size=16), dp=dp)
    per_epoch = math.ceil(len(seqs) / 16)
    assert res.steps == 2 * per_epoch
    assert res.sample_rate == pytest.approx(1 / per_epoch)
    assert res.history == [(1.1, res.sample_rate, res.steps)]
    acc = RDPAccountant()
    for _ in range(res.steps):
        acc.step(noise_multiplier=1.1, sample_rate=res.sample_rate)
    direct = acc.get_epsilon(delta=1e-5)
    assert abs(epsilon_of(res.history, delta=1e-5) - direct) <= 1e-9
    assert 0 < direct < math.inf
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(getattr(p, "grad_sample", None) is None for p in m.parameters())
    # the trained module is a plain model again: it samples well-formed futures
    futs = sample(m, tok, _prompts(tok, records, n=2), SamplingConfig(max_new=30))
    assert all(is_well_formed(tok, f, 30)[0] for f in futs)


def test_ghost_clipping_trains_the_generator(tok, seqs):
    m = build_generator(tok, **TINY)
    before = [p.detach().clone() for p in m.parameters()]
    res = train_generator(m, tok, seqs[:24], TrainConfig(epochs=1, batch_size=8),
                          dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost"))
    assert res.steps == 3 and math.isfinite(res.loss) and res.history == [(1.0, pytest.approx(1 / 3), 3)]
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_to_dataset_right_pads_with_a_mask(tok):
    ds = to_dataset([[1, 5, 6, 2], [1, 7, 2]], pad_id=tok.pad_id)
    ids, mask = ds.tensors
    assert ids.tolist() == [[1, 5, 6, 2], [1, 7, 2, tok.pad_id]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
