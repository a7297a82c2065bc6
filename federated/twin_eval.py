"""Evaluate a trained twin generator against real patients: fidelity, utility, privacy.

One function, `evaluate_generator`, serves the CLI, the benchmarks and the tests:
- fidelity: twins of held-out patients (under their real arm, censoring allowed, as in
  observed data) against those patients' real futures: unigram/bigram token-frequency
  R², per-window value marginals, Kaplan-Meier curves per arm;
- utility: a Cox model fitted on twins of the training patients (their baseline and
  history, generated outcomes) against one fitted on the real training outcomes, both
  scored by C-index on the held-out patients (TSTR vs TRTR);
- privacy: membership inference against training patients vs held-out patients, by how
  close each patient's twin comes to their real future (distance attack) and by the
  model's likelihood of their real sequence; nearest-neighbour adversarial accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import evaluation as ev
from .generation import SamplingConfig, sequence_nlls
from .models.twin_gpt import TwinGPT
from .quality import generate_twins
from .record import Arm, PatientRecord
from .tokenizer import EventTokenizer


def _twins_under_own_arm(model, tok, patients, sampling, meta, on_progress):
    out: list[PatientRecord | None] = [None] * len(patients)
    failed = 0
    for arm in (Arm.CONTROL, Arm.TREATMENT):
        idx = [i for i, p in enumerate(patients) if p.arm == arm]
        if not idx:
            continue
        twins, fails, _ = generate_twins(model, tok, [patients[i] for i in idx], arm=arm, n=1, sampling=sampling,
                                         meta=meta, allow_censoring=True, on_progress=on_progress)
        failed += len(fails)
        for t in twins:
            out[idx[t.row]] = t.record
    return out, failed


def _future_tokens(tok: EventTokenizer, records, meta) -> list[list[str]]:
    seqs = []
    for r in records:
        e = tok.encode(r, meta=meta)
        seqs.append(tok.token_strings(e.ids[e.prompt_len:]))
    return seqs


def evaluate_generator(model: TwinGPT, tok: EventTokenizer, train: list[PatientRecord], test: list[PatientRecord],
                       *, sampling: SamplingConfig, meta: dict[str, str] | None = None, max_members: int = 1000,
                       seed: int = 0, on_progress: Callable[[int], None] | None = None) -> dict:
    """The evaluation report; `train` are the model's training patients (members), `test` held-out ones."""
    train = [r for r in train if r.arm is not None]
    test = [r for r in test if r.arm is not None]
    if len(test) < 10:
        raise ValueError(f"need at least 10 held-out patients with an arm to evaluate, got {len(test)}")
    rng = np.random.default_rng(seed)
    members = [train[i] for i in sorted(rng.choice(len(train), size=min(len(train), max_members, len(test) * 2),
                                                   replace=False))] if train else []
    h = tok.spec.horizon_days
    codes = sorted(tok.value_ids)

    test_twins, failed_test = _twins_under_own_arm(model, tok, test, sampling, meta, on_progress)
    keep = [i for i, t in enumerate(test_twins) if t is not None]
    real_t, twin_t = [test[i] for i in keep], [test_twins[i] for i in keep]
    real_tokens, twin_tokens = _future_tokens(tok, real_t, meta), _future_tokens(tok, twin_t, meta)
    fidelity = {
        "unigram_r2": ev.unigram_r2(real_tokens, twin_tokens),
        "bigram_r2": ev.bigram_r2(real_tokens, twin_tokens),
        "km_by_arm": ev.km_by_arm(real_t, twin_t, h),
        "visit_marginals": ev.visit_marginals(real_t, twin_t, codes) if codes else [],
    }
    utility: dict = {"tstr": None, "trtr": None}
    privacy: dict = {"mia_auc": None, "nnaa": None}
    failed_members = 0
    if members:
        member_twins, failed_members = _twins_under_own_arm(model, tok, members, sampling, meta, on_progress)
        mk = [i for i, t in enumerate(member_twins) if t is not None]
        m_real, m_twin = [members[i] for i in mk], [member_twins[i] for i in mk]
        cov = dict(codes=codes, horizon=h, reference=m_real, include_future=False, include_outcomes=False)
        tt = lambda rs: np.array([min(r.outcomes.time_to_event, h) for r in rs])  # noqa: E731
        ee = lambda rs: np.array([float(bool(r.outcomes.event) and r.outcomes.time_to_event <= h) for r in rs])  # noqa: E731
        if sum(ee(m_real)) >= 5 and sum(ee(m_twin)) >= 5 and sum(ee(test)) >= 2:
            utility = ev.tstr_trtr(ev.record_features(m_real, **cov), tt(m_real), ee(m_real),
                                   ev.record_features(m_twin, **cov), tt(m_twin), ee(m_twin),
                                   ev.record_features(test, **cov), tt(test), ee(test))
        # generated parts only: twins share their patient's baseline and history by construction
        names = ev.record_feature_names(m_real, codes, reference=m_real)
        gen_cols = [i for i, n in enumerate(names) if n.startswith(("future_", "outcome_"))]
        feats = lambda rs: ev.record_features(rs, codes, h, reference=m_real)[:, gen_cols]  # noqa: E731
        d_member = np.linalg.norm(feats(m_real) - feats(m_twin), axis=1)
        d_non = np.linalg.norm(feats(real_t) - feats(twin_t), axis=1)
        distance_auc = ev.auroc(np.r_[np.ones(len(d_member)), np.zeros(len(d_non))], -np.r_[d_member, d_non])
        nll = lambda rs: sequence_nlls(model, [tok.encode(r, meta=meta).ids for r in rs], pad_id=tok.pad_id)  # noqa: E731
        likelihood_auc = ev.mia_likelihood_auc(nll(m_real), nll(test))
        privacy = {"mia_auc": max(distance_auc, likelihood_auc), "mia_distance_auc": distance_auc,
                   "mia_likelihood_auc": likelihood_auc, "nnaa": ev.nnaa(feats(m_real), feats(m_twin), seed=seed)}
    return ev.summarize(fidelity, utility, privacy, extra={
        "patients": {"members": len(members), "held_out": len(test),
                     "twins_failed_gate": failed_test + failed_members}})
