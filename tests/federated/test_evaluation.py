import itertools
import json

import numpy as np
import pytest

from evoclone.federated.evaluation import (auroc, bigram_r2, km_by_arm, km_comparison, mia_distance_auc,
                                           mia_likelihood_auc, nnaa, r2_score, record_feature_names,
                                           record_features, summarize, tstr_trtr, tstr_trtr_binary, unigram_r2,
                                           visit_marginals)
from evoclone.federated.record import Arm, Event, Outcomes, PatientRecord

VOCAB = [f"tok{i}" for i in range(30)]


def _seqs(rng, n, probs, length=20):
    return [list(rng.choice(VOCAB, size=length, p=probs)) for _ in range(n)]


def _zipf():
    p = 1.0 / np.arange(1, len(VOCAB) + 1)
    return p / p.sum()


# ---------------------------------------------------------------- fidelity


def test_r2_identical_is_one_and_unrelated_is_much_lower():
    rng = np.random.default_rng(0)
    real = _seqs(rng, 200, _zipf())
    assert unigram_r2(real, real) == 1.0 and bigram_r2(real, real) == 1.0
    same = _seqs(np.random.default_rng(1), 200, _zipf())  # independent draw, same distribution
    assert unigram_r2(real, same) > 0.95 and bigram_r2(real, same) > 0.5
    flipped = _seqs(np.random.default_rng(2), 200, _zipf()[::-1])  # rarest types become the most common
    assert unigram_r2(real, flipped) < 0.0 and bigram_r2(real, flipped) < 0.0
    # same tokens, shuffled order: unigrams unchanged, bigrams lose their structure
    ordered = [["a", "b", "c", "d"] * 5 for _ in range(50)]
    shuffled = [list(np.random.default_rng(i).permutation(s)) for i, s in enumerate(ordered)]
    assert unigram_r2(ordered, shuffled) == 1.0 and bigram_r2(ordered, shuffled) < 0.5


def test_r2_is_the_coefficient_of_determination_over_the_union_of_types():
    real = [["a", "a", "b"]]  # freqs a=2/3 b=1/3 c=0
    synth = [["a", "c"]]  # a=1/2 b=0 c=1/2
    r, s = np.array([2 / 3, 1 / 3, 0]), np.array([0.5, 0, 0.5])
    expected = 1 - ((s - r) ** 2).sum() / ((r - r.mean()) ** 2).sum()
    assert unigram_r2(real, synth) == pytest.approx(expected)
    # bigrams never cross sequence boundaries: [a b] [a b] has only the pair (a, b)
    assert bigram_r2([["a", "b"], ["a", "b"]], [["a", "b", "a", "b"]]) < 1.0
    assert unigram_r2([["<pad>", "a", "b"]], [["a", "b", "<pad>", "<pad>"]], ignore={"<pad>"}) == 1.0
    assert r2_score(np.ones(3), np.ones(3)) == 1.0 and r2_score(np.ones(3), np.zeros(3)) == 0.0


@pytest.mark.parametrize("call, match", [
    (lambda: unigram_r2([], [["a"]]), "real_seqs is empty"),
    (lambda: unigram_r2([["a"]], []), "synth_seqs is empty"),
    (lambda: unigram_r2(["ab"], [["a"]]), r"real_seqs\[0\] is not a list"),
    (lambda: bigram_r2([["a"]], [["a", "b"]]), "real sequences hold no token pairs"),
    (lambda: unigram_r2([[]], [["a"]]), "real sequences hold no tokens"),
])
def test_r2_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- records


def _record(i, arm, *, t, ev, history=(), future=(), age=60.0):
    events = [Event(time=tt, code=c, value=v) for tt, c, v in (*history, *future)]
    return PatientRecord(patient_id=f"patient-{i:04d}", site="s", baseline={"age": age, "sex": "F", "bmi": None},
                         arm=arm, events=tuple(events), outcomes=Outcomes(time_to_event=t, event=ev))


def test_visit_marginals_windows_and_statistics():
    real = [_record(0, Arm.CONTROL, t=100, ev=True, history=[(-30, "ldl", 999.0)],
                    future=[(90, "ldl", 100.0), (91, "ldl", 120.0), (200, "ldl", 80.0), (90, "hba1c", 7.0)]),
            _record(1, Arm.CONTROL, t=400, ev=False, future=[(10, "ldl", 110.0), (5000, "ldl", 1.0)])]
    twins = [_record(2, Arm.CONTROL, t=1095, ev=False, future=[(45, "ldl", 100.0), (45, "ldl", 100.0)])]
    rows = visit_marginals(real, twins, ["ldl"], bins_days=(0, 90, 180, 365))
    assert [r["window"] for r in rows] == [[0, 90], [90, 180], [180, 365]]
    first, second, third = rows
    # (0, 90] holds day 10 and day 90 (right-closed); history (day -30) and day 5000 are outside
    assert first["real_n"] == 2 and first["real_mean"] == pytest.approx(105.0)
    assert first["real_sd"] == pytest.approx(np.std([100.0, 110.0], ddof=1))
    assert first["twin_n"] == 2 and first["twin_mean"] == 100.0 and first["twin_sd"] == 0.0
    assert first["smd"] == pytest.approx(-5.0 / np.sqrt(np.var([100, 110], ddof=1) / 2))
    assert second["real_n"] == 1 and second["real_sd"] is None and second["twin_n"] == 0
    assert second["twin_mean"] is None and second["smd"] is None and third["real_mean"] == 80.0
    json.dumps(rows)
    with pytest.raises(ValueError, match="strictly increasing"):
        visit_marginals(real, twins, ["ldl"], bins_days=(0, 90, 90))
    with pytest.raises(ValueError, match="twins is empty"):
        visit_marginals(real, [], ["ldl"])


def _survival(rng, n, scale=500.0):
    t = rng.exponential(scale, n)
    c = rng.uniform(0, 1500, n)
    return np.minimum(t, c), (t <= c).astype(float)


def test_km_comparison_identical_and_different():
    rng = np.random.default_rng(0)
    t, e = _survival(rng, 150)
    same = km_comparison(t, e, t, e, horizon=1095, grid=20)
    assert same["max_abs_diff"] == 0.0 and same["logrank_p"] == pytest.approx(1.0)
    assert len(same["grid"]) == len(same["real"]) == 20 and same["grid"][-1] == 1095.0
    assert same["real"][0] == 1.0 and all(np.diff(same["real"]) <= 0)
    t2, e2 = _survival(rng, 150, scale=100.0)  # five times the hazard
    diff = km_comparison(t, e, t2, e2, horizon=1095)
    assert diff["max_abs_diff"] > 0.3 and diff["logrank_p"] < 1e-6
    # real follow-up past the horizon is censored there, exactly like a twin that reached it
    a = km_comparison([2000.0, 50.0], [1, 1], [1095.0, 50.0], [0, 1], horizon=1095)
    assert a["max_abs_diff"] == 0.0
    json.dumps(a)
    with pytest.raises(ValueError, match="real_event has 2 entries but 3"):
        km_comparison([1, 2, 3], [1, 0], t, e, horizon=100)
    with pytest.raises(ValueError, match="twin_time must be a non-empty"):
        km_comparison(t, e, [], [], horizon=100)
    with pytest.raises(ValueError, match="horizon must be a positive"):
        km_comparison(t, e, t, e, horizon=0)


def test_km_by_arm_compares_same_arm_only():
    real = [_record(i, Arm(i % 2), t=100.0 + 300 * (i % 2) + i, ev=True) for i in range(20)]
    twins = [r.model_copy(update={"patient_id": f"twin-{i:05d}"}) for i, r in enumerate(real)]
    out = km_by_arm(real, twins, horizon=1095)
    assert set(out) == {"CONTROL", "TREATMENT"} and all(v["max_abs_diff"] == 0.0 for v in out.values())
    with pytest.raises(ValueError, match="arm TREATMENT have no real patients"):
        km_by_arm(real[::2], twins, horizon=1095)


def test_record_features_columns_fill_and_reference_scale():
    recs = [
        _record(0, Arm.CONTROL, t=2000, ev=True, history=[(-60, "ldl", 150.0), (-10, "ldl", 140.0)],
                future=[(30, "ldl", 100.0), (30, "egfr", 70.0), (60, "ldl", 80.0), (1200, "ldl", 0.0)], age=50),
        _record(1, Arm.TREATMENT, t=300, ev=True, history=[(-5, "ldl", 120.0)], age=70),
        _record(2, Arm.TREATMENT, t=500, ev=False, future=[(100, "ldl", 60.0)], age=60),
    ]
    names = record_feature_names(recs, ["ldl", "egfr"])
    assert names == ["baseline:age", "arm", "last:ldl", "last:egfr", "future_mean:ldl", "future_mean:egfr",
                     "future_visits", "outcome_time", "outcome_event"]  # sex is a string, bmi never given
    x = record_features(recs, ["ldl", "egfr"], horizon=1095)
    assert x.shape == (3, len(names)) and np.isfinite(x).all()
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-12)  # standardized on itself
    raw = {"last:ldl": [140, 120, 130], "future_mean:ldl": [90, 75, 60], "future_visits": [2, 0, 1],
           "outcome_time": [1095, 300, 500], "outcome_event": [0, 1, 0]}  # NaN -> column mean; censored at horizon
    for k, v in raw.items():
        v = np.asarray(v, float)
        np.testing.assert_allclose(x[:, names.index(k)], (v - v.mean()) / v.std(), err_msg=k)
    assert (x[:, names.index("future_mean:egfr")] == 0).all()  # one value: constant after filling, not NaN
    # another set on the reference's scale: a copy of record 1 lands exactly on record 1's row
    y = record_features([recs[1]], ["ldl", "egfr"], horizon=1095, reference=recs)
    np.testing.assert_allclose(y[0], x[1])
    cox = record_features(recs, ["ldl"], 1095, include_future=False, include_outcomes=False)
    assert cox.shape == (3, 3)
    with pytest.raises(ValueError, match="records is empty"):
        record_features([], ["ldl"], 1095)
    with pytest.raises(ValueError, match="records\\[0\\] is a dict"):
        record_features([{}], ["ldl"], 1095)


# ---------------------------------------------------------------- utility


def _cox_data(rng, n, beta=(1.0, -0.5, 0.0)):
    x = rng.normal(size=(n, len(beta)))
    t = rng.exponential(1.0, n) / np.exp(x @ np.asarray(beta)) * 300
    c = rng.uniform(0, 900, n)
    return x, np.minimum(t, c), (t <= c).astype(float)


def test_tstr_equals_trtr_when_synthetic_is_the_real_training_data():
    rng = np.random.default_rng(0)
    x, t, e = _cox_data(rng, 200)
    tx, tt, te = _cox_data(rng, 150)
    out = tstr_trtr(x, t, e, x, t, e, tx, tt, te)
    assert out["tstr"] == pytest.approx(out["trtr"], abs=1e-9) and out["trtr"] > 0.65
    noise = rng.normal(size=x.shape)  # covariates unrelated to the outcome: about chance
    bad = tstr_trtr(x, t, e, noise, t, e, tx, tt, te)
    assert bad["trtr"] == out["trtr"] and abs(bad["tstr"] - 0.5) < 0.1
    with pytest.raises(ValueError, match="synth_X has 2 features but 3"):
        tstr_trtr(x, t, e, x[:, :2], t, e, tx, tt, te)
    with pytest.raises(ValueError, match="synth_time has 199 entries but 200"):
        tstr_trtr(x, t, e, x, t[1:], e, tx, tt, te)
    with pytest.raises(ValueError, match="synthetic training data has no events"):
        tstr_trtr(x, t, e, x, t, np.zeros_like(e), tx, tt, te)
    with pytest.raises(ValueError, match="NaN or infinite"):
        tstr_trtr(x, t, e, np.full_like(x, np.nan), t, e, tx, tt, te)


def test_tstr_trtr_binary():
    rng = np.random.default_rng(1)
    w = np.array([2.0, -1.0, 0.0])
    x, tx = rng.normal(size=(300, 3)), rng.normal(size=(200, 3))
    y = (rng.random(300) < 1 / (1 + np.exp(-x @ w))).astype(float)
    ty = (rng.random(200) < 1 / (1 + np.exp(-tx @ w))).astype(float)
    out = tstr_trtr_binary(x, y, x, y, tx, ty)
    assert out["tstr"] == out["trtr"] and out["trtr"] > 0.75
    flipped = tstr_trtr_binary(x, y, x, 1 - y, tx, ty)  # synthetic labels inverted: the model ranks backwards
    assert flipped["tstr"] < 0.3
    with pytest.raises(ValueError, match="both classes"):
        tstr_trtr_binary(x, y, x, np.ones(300), tx, ty)


# ---------------------------------------------------------------- privacy


def _brute_auc(pos, neg):
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])


def test_auc_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos, neg = rng.integers(0, 5, rng.integers(1, 30)), rng.integers(0, 5, rng.integers(1, 30))
        assert mia_likelihood_auc(-pos, -neg) == pytest.approx(_brute_auc(pos, neg), abs=1e-12)
        labels = np.r_[np.ones(pos.size), np.zeros(neg.size)]
        assert auroc(labels, np.r_[pos, neg]) == pytest.approx(_brute_auc(pos, neg), abs=1e-12)
    same = rng.normal(size=2000)
    assert mia_likelihood_auc(same[:1000], same[1000:]) == pytest.approx(0.5, abs=0.05)
    assert mia_likelihood_auc(np.zeros(10), np.zeros(10)) == 0.5  # all tied
    assert mia_likelihood_auc(np.zeros(10), np.ones(10)) == 1.0  # members fit better (lower nll)
    with pytest.raises(ValueError, match="member_nll must be a non-empty"):
        mia_likelihood_auc([], [1.0])
    with pytest.raises(ValueError, match="single class"):
        auroc([1, 1], [0.2, 0.3])


def test_mia_distance_auc():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    assert mia_distance_auc(members, nonmembers, rng.normal(size=(200, 4))) == pytest.approx(0.5, abs=0.08)
    leaked = members + rng.normal(scale=0.01, size=members.shape)  # twins that copy their training patients
    assert mia_distance_auc(members, nonmembers, leaked) > 0.95
    with pytest.raises(ValueError, match="nonmember_X has 3 features but 4"):
        mia_distance_auc(members, nonmembers[:, :3], leaked)


def test_nnaa_independent_far_and_memorised():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 3))
    assert nnaa(real, rng.normal(size=(300, 3))) == pytest.approx(0.5, abs=0.06)
    assert nnaa(real, rng.normal(size=(300, 3)) + 10.0) == 1.0
    # exact copies: d_TS = d_ST = 0, so no strict "d_TS > d_TT" holds and AA = 0
    assert nnaa(real, real.copy()) == 0.0
    near_copies = real + rng.normal(scale=0.01, size=real.shape)
    assert nnaa(real, near_copies) < 0.1
    # ten twins per patient: balancing keeps the independent draw near 0.5 and is seeded
    many = rng.normal(size=(3000, 3))
    assert nnaa(real, many) == pytest.approx(0.5, abs=0.06) and nnaa(real, many) == nnaa(real, many, seed=0)
    with pytest.raises(ValueError, match="at least 2 real and 2 synthetic"):
        nnaa(real[:1], real)


def test_summarize_shape():
    out = summarize({"unigram_r2": 0.97, "bigram_r2": np.float64(0.9)}, {"tstr": 0.70, "trtr": 0.72, "metric": "c"},
                    {"mia_distance_auc": 0.52, "mia_likelihood_auc": 0.58, "nnaa": 0.49}, extra={"n_twins": 10})
    assert out["fidelity"] == {"unigram_r2": 0.97, "bigram_r2": 0.9}
    assert out["utility"] == {"tstr": 0.70, "trtr": 0.72, "metric": "c"}
    assert out["privacy"]["mia_auc"] == 0.58 and out["privacy"]["nnaa"] == 0.49
    assert list(out) == ["fidelity", "utility", "privacy", "n_twins"]
    assert list(out["privacy"])[:2] == ["mia_auc", "nnaa"]
    json.loads(json.dumps(out, allow_nan=False))
    one = summarize({"unigram_r2": 1, "bigram_r2": float("nan")}, {"tstr": 0.5, "trtr": 0.5},
                    {"mia_distance_auc": 0.6, "nnaa": 0.5})
    assert one["privacy"] == {"mia_auc": 0.6, "nnaa": 0.5, "mia_distance_auc": 0.6}
    assert one["fidelity"]["bigram_r2"] is None
    with pytest.raises(ValueError, match="privacy lacks mia_auc"):
        summarize({"unigram_r2": 1, "bigram_r2": 1}, {"tstr": 0.5, "trtr": 0.5}, {"nnaa": 0.5})
    with pytest.raises(ValueError, match="utility lacks trtr"):
        summarize({"unigram_r2": 1, "bigram_r2": 1}, {"tstr": 0.5}, {"mia_auc": 0.5, "nnaa": 0.5})
