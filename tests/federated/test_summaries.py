"""Mergeable data summaries: exact on one site, close when merged, rare cells suppressed."""

from __future__ import annotations

import numpy as np
import pytest

from evoclone.federated.features import FeatureSpec, spec_from_summary
from evoclone.federated.record import Event, Outcomes, PatientRecord
from evoclone.federated.summaries import GRID, DataSummary, NumericSummary, merge, summarize
from evoclone.federated.tokenizer import EventTokenizer


def _records(n: int, seed: int, site: str = "a") -> list[PatientRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        events = [Event(time=float(-rng.integers(1, 700)), code="crp", value=float(rng.lognormal(0, 1)), unit="mg/L")]
        if i % 50 == 0:
            events.append(Event(time=-3.0, code="rare", value=1.0, unit=""))
        out.append(PatientRecord(
            patient_id=f"{site}-{seed}-{i:06d}", site=site,
            baseline={"age": float(rng.normal(60, 10)), "nodes": float(rng.poisson(2) * rng.integers(1, 4)),
                      "sex": "F" if rng.random() < 0.5 else "M", "smoker": float(rng.random() < 0.3),
                      "stage": "IV" if i % 40 == 0 else "II"},
            events=tuple(events), outcomes=Outcomes(time_to_event=float(rng.exponential(500)), event=True)))
    return out


def test_numeric_summary_is_exact_on_one_site_and_merges_moments_exactly():
    rng = np.random.default_rng(1)
    a, b = rng.normal(5, 2, 300), rng.normal(7, 3, 200)
    sa = NumericSummary.of(a)
    assert np.allclose(sa.q, np.quantile(a, GRID))
    m = NumericSummary.merge([sa, NumericSummary.of(b)])
    both = np.concatenate([a, b])
    assert m.n == 500 and m.mean == pytest.approx(both.mean()) and m.std(1) == pytest.approx(both.std(ddof=1))
    # quantile averaging is close to the pooled quantiles (not exact for different distributions)
    assert abs(m.quantile(0.5) - np.median(both)) < 0.3


def test_min_count_suppresses_rare_levels_codes_and_small_numeric_columns():
    s = summarize(_records(200, 0), min_count=10, coarse=True)
    stage = s.column("stage")
    assert stage.levels == {"II": 195}  # "IV" seen in 5 patients stays at the site
    assert [c.code for c in s.codes] == ["crp"]  # "rare" seen in 4 patients is left out
    small = summarize(_records(8, 0), min_count=10)
    assert small.column("age").values is None and small.followup is None or small.followup.n == 8
    assert all(len(f"{x:.6g}".replace("-", "").replace(".", "").lstrip("0")) <= 3 for x in s.column("age").values.q)


def test_federated_spec_and_vocabulary_match_the_pooled_ones():
    sites = [_records(300, seed, site) for seed, site in ((1, "a"), (2, "b"), (3, "c"))]
    pooled = [r for recs in sites for r in recs]
    merged = merge([summarize(recs, coarse=True) for recs in sites])
    central = summarize(pooled)
    assert merged.records == central.records == 900
    f_spec, c_spec = spec_from_summary(FeatureSpec, merged), FeatureSpec.fit(pooled)
    assert c_spec == spec_from_summary(FeatureSpec, central)  # one fitting code path
    assert [n[0] for n in f_spec.numeric] == [n[0] for n in c_spec.numeric] == ["age", "nodes"]
    assert f_spec.binary == c_spec.binary == ("smoker",)
    # a level rare at every site (8 patients each) stays at the sites even if the pool has 24
    assert dict(c_spec.categorical) == {"sex": ("F", "M"), "stage": ("II", "IV")}
    assert dict(f_spec.categorical) == {"sex": ("F", "M"), "stage": ("II",)}
    for f, c in zip(f_spec.numeric, c_spec.numeric):
        assert f[1] == pytest.approx(c[1], rel=0.1, abs=0.2) and f[2] == pytest.approx(c[2], rel=0.15)
    assert [lab[0] for lab in f_spec.labs] == ["crp"] and f_spec.labs[0][4] == c_spec.labs[0][4]
    tok_f, tok_c = EventTokenizer.from_summary(merged), EventTokenizer.fit(pooled)
    assert [c.code for c in tok_f.spec.codes] == ["crp"]  # "rare": 6 patients per site, 18 pooled
    assert [c.code for c in tok_c.spec.codes] == ["crp", "rare"]
    assert abs(tok_f.spec.horizon_days - tok_c.spec.horizon_days) <= 60
    # the JSON form a site sends round-trips
    assert DataSummary.from_dict(merged.to_dict()).to_dict() == merged.to_dict()


def test_merge_refuses_summaries_with_different_settings():
    with pytest.raises(ValueError, match="different history windows or minimum counts"):
        merge([summarize(_records(50, 0), min_count=10), summarize(_records(50, 1), min_count=5)])
    with pytest.raises(ValueError, match="not an evoclone data summary"):
        DataSummary.from_dict({"format": "other"})


def test_early_stopping_rule():
    from evoclone.federated.flower.server_app import _stalled

    rounds = [{"val_loss": v} for v in (1.0, 0.9, 0.95, 0.93)]
    assert _stalled(rounds, patience=2, min_delta=0.0)  # best 0.9 not beaten in the last two
    assert not _stalled(rounds, patience=3, min_delta=0.0)
    assert not _stalled(rounds[:2], patience=1, min_delta=0.0)  # 0.9 beat 1.0
    assert _stalled(rounds[:2], patience=1, min_delta=0.2)  # ... but not by 0.2
    assert not _stalled([{"val_loss": float("nan")}] * 4, patience=1, min_delta=0.0)


def test_strategies_from_the_run_config():
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    from evoclone.federated.flower.server_app import StudyError, make_strategy

    rc = {"strategy": "fedprox", "proximal-mu": 0.5, "server-learning-rate": 0.02, "learning-rate": 0.003}
    prox = make_strategy(rc, 2)
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.5 and prox.min_train_nodes == 2
    adam = make_strategy({**rc, "strategy": "fedadam"}, 3)
    assert isinstance(adam, FedAdam) and adam.eta == 0.02
    assert type(make_strategy({**rc, "strategy": "fedavg"}, 2)) is FedAvg
    with pytest.raises(StudyError, match="fedavg, fedprox or fedadam"):
        make_strategy({**rc, "strategy": "krum"}, 2)
