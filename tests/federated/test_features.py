import json
import math
import random

import numpy as np
import pytest

from evoclone.federated.features import FeatureSpec, encode, encode_cohort, lab_trend
from evoclone.federated.record import Arm, Event, Outcomes, PatientRecord

# snapshots and manifests already written carry these: the fixed spec must never drift
DEFAULT_FINGERPRINT = "f04dd3a6047fb6b92c7595c22d6782fbff8ed1077b17035099e29fd6bb29dc0b"
# the default spec as written before lab trends existed: it must still read, encode and fingerprint as then
PRE_TRENDS_FINGERPRINT = "c10766c4bdb4e402889727dd85bac20b2dc83a68b2519ed87ad0bea7cadcdb5f"


def _cohort(n=200, seed=0, rare_level=True):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        site = "rare" if rare_level and i < 3 else ["north", "south"][i % 2]
        events = [Event(time=float(-t), code="LAB1", value=float(rng.normal(100, 15))) for t in (300, 100, 0)]
        events.append(Event(time=-50.0, code="CRP", value=float(rng.lognormal(0, 1.5))))
        if i < 4:
            events.append(Event(time=-10.0, code="RARE", value=1.0))
        events.append(Event(time=200.0, code="LATER", value=5.0))  # after the index: never encoded
        out.append(PatientRecord(
            patient_id=f"row-{i:08d}", site="s", arm=Arm(i % 2), events=tuple(events),
            baseline={"age": float(rng.normal(60, 10)), "flag": float(i % 3 == 0), "site_kind": site,
                      "const": 5.0},
            outcomes=Outcomes(time_to_event=float(100 + i), event=bool(i % 2))))
    return out


def test_default_spec_is_unchanged():
    spec = FeatureSpec()
    assert spec.fingerprint() == DEFAULT_FINGERPRINT
    assert FeatureSpec.from_dict(spec.to_dict()) == spec


def test_a_spec_written_before_lab_trends_keeps_its_layout():
    old_doc = FeatureSpec().to_dict()
    del old_doc["lab_trends"]  # what manifests and snapshots written before trends carry
    old = FeatureSpec.from_dict(old_doc)
    assert not old.lab_trends and old.fingerprint() == PRE_TRENDS_FINGERPRINT and old.to_dict() == old_doc
    assert old.static_dim == FeatureSpec().static_dim - len(old.labs)
    static, _, _ = encode(_trend_record([(-300.0, 100.0), (0.0, 130.0)]), old)
    assert len(static) == old.static_dim


def _trend_record(ldl: list[tuple[float, float]]) -> PatientRecord:
    return PatientRecord(patient_id="row-00000009", site="s", arm=Arm.CONTROL, baseline={},
                         events=tuple(Event(time=t, code="13457-7", value=v) for t, v in ldl))


def test_lab_trend_is_the_least_squares_change_across_the_window():
    spec = FeatureSpec()  # ldl: scale 30 mg/dL, window 730 days
    names = spec.feature_names()[0]
    trend = len(names) - len(spec.labs)  # the trends close the static vector, ldl's first
    # +30 mg/dL a year on the lab's scale (30): 1 z a year, 2 z across the two-year window
    rising = _trend_record([(-365.0, 100.0), (-200.0, 100.0 + 30 * 165 / 365), (0.0, 130.0)])
    assert encode(rising, spec)[0][trend] == pytest.approx(2.0, abs=1e-5)
    assert names[trend] == "ldl" and len(names) == spec.static_dim
    t = np.array([-700.0, -400.0, -90.0, 0.0])
    v = 3 - 0.004 * t + np.array([0.1, -0.2, 0.15, -0.05])
    assert lab_trend(list(t), list(v), 730.0) == pytest.approx(np.polyfit(t, v, 1)[0] * 730.0)
    # one value, values within TREND_MIN_SPAN_DAYS, and values outside the window or after the index: no trend
    for events in ([(0.0, 130.0)], [(-60.0, 100.0), (0.0, 190.0)], [(-900.0, 40.0), (0.0, 130.0), (30.0, 300.0)]):
        assert encode(_trend_record(events), spec)[0][trend] == 0.0
    assert lab_trend([-700.0, 0.0], [-100.0, 100.0], 730.0) == 6.0  # clipped like every scaled value


def test_fit_derives_types_levels_and_labs():
    spec = FeatureSpec.fit(_cohort())
    assert [n for n, _, _ in spec.numeric] == ["age", "const"]
    assert spec.binary == ("flag",)
    assert spec.categorical == (("site_kind", ("north", "south")),)  # "rare" (3 rows) gets no indicator
    assert [lab[0] for lab in spec.labs] == ["CRP", "LAB1"]  # sorted; RARE (4 records) and LATER left out
    labs = {lab[0]: lab for lab in spec.labs}
    assert labs["CRP"][4] is True and labs["LAB1"][4] is False
    assert labs["LAB1"][1] == "LAB1"
    assert 90 <= labs["LAB1"][2] <= 110 and 10 <= labs["LAB1"][3] <= 20
    age = dict((n, (c, s)) for n, c, s in spec.numeric)["age"]
    for x in (*age, labs["LAB1"][2], labs["LAB1"][3], labs["CRP"][3]):
        assert float(f"{x:.2g}") == x  # two significant digits
    assert dict((n, (c, s)) for n, c, s in spec.numeric)["const"] == (5.0, 1.0)  # no spread: scale 1
    loose = FeatureSpec.fit(_cohort(), min_count=3)
    assert loose.categorical == (("site_kind", ("north", "rare", "south")),)
    assert "RARE" in [lab[0] for lab in loose.labs]


def test_fit_covariate_selection_and_windows():
    records = _cohort()
    spec = FeatureSpec.fit(records, covariates=["flag", "age"], max_visits=4, history_days=120)
    assert spec.binary == ("flag",) and [n for n, _, _ in spec.numeric] == ["age"] and spec.categorical == ()
    assert spec.max_visits == 4 and spec.history_days == 120.0
    arrays = encode_cohort(records, spec)
    assert arrays["visits"].shape == (len(records), 4, spec.visit_dim)
    assert arrays["lengths"].max() == 3  # the -300 day visit is outside the window
    sd_only = [PatientRecord(patient_id=f"row-{i:08d}", site="s", baseline={"x": 7.0 if i < 18 else 9.0})
               for i in range(20)]
    sd = np.std([7.0] * 18 + [9.0] * 2, ddof=1)  # the IQR is 0: the sd takes over
    assert FeatureSpec.fit(sd_only).numeric[0][2] == float(f"{sd:.2g}")
    with pytest.raises(ValueError, match="min_count"):
        FeatureSpec.fit(records, min_count=0)
    with pytest.raises(ValueError, match="zero records"):
        FeatureSpec.fit([])


def test_fit_is_deterministic_and_order_free():
    records = _cohort()
    a = FeatureSpec.fit(records)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    assert FeatureSpec.fit(records).fingerprint() == a.fingerprint() == FeatureSpec.fit(shuffled).fingerprint()
    assert FeatureSpec.fit(_cohort(seed=1)).fingerprint() != a.fingerprint()


def test_to_dict_from_dict_round_trip():
    spec = FeatureSpec.fit(_cohort())
    doc = json.loads(json.dumps(spec.to_dict()))
    back = FeatureSpec.from_dict(doc)
    assert back == spec and back.fingerprint() == spec.fingerprint()
    assert isinstance(back.labs[0], tuple) and isinstance(back.categorical[0][1], tuple)
    # integers from a hand-edited or other-language JSON still give the same fingerprint
    doc["history_days"] = 730
    doc["numeric"][1][1] = int(doc["numeric"][1][1])
    assert FeatureSpec.from_dict(doc).fingerprint() == spec.fingerprint()
    with pytest.raises(ValueError, match="unknown keys"):
        FeatureSpec.from_dict({**doc, "extra": 1})


def test_feature_names_match_columns():
    for spec in (FeatureSpec(), FeatureSpec.fit(_cohort())):
        static, visit = spec.feature_names()
        assert len(static) == spec.static_dim and len(visit) == spec.visit_dim
    static, visit = FeatureSpec.fit(_cohort()).feature_names()
    assert static == ["age", "const", "flag", "site_kind", "site_kind", "arm", "CRP", "CRP", "LAB1", "LAB1", "CRP",
                      "LAB1"]
    assert visit == ["time", "gap", "CRP", "CRP", "LAB1", "LAB1"]
    assert FeatureSpec().feature_names()[1][2:4] == ["ldl", "ldl"]


def test_encode_treats_missing_numbers_as_centred():
    spec = FeatureSpec.fit(_cohort())
    for missing in (None, math.nan):
        r = PatientRecord(patient_id="row-00000000", site="s", arm=Arm.TREATMENT,
                          baseline={"age": missing, "flag": missing, "site_kind": missing, "const": 5.0})
        static, visits, n = encode(r, spec)
        assert not np.isnan(static).any() and n == 1
        assert static.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    rare = PatientRecord(patient_id="row-00000001", site="s", baseline={"site_kind": "rare", "age": 1e9})
    static, _, _ = encode(rare, spec)
    assert static[3:5].tolist() == [0.0, 0.0] and static[0] == 6.0  # rare level: no indicator; clipped
    default = FeatureSpec()
    r = PatientRecord(patient_id="row-00000002", site="s", baseline={"age": math.nan, "diabetes": math.nan,
                                                                    "sex": math.nan, "bmi": 33.0})
    static, _, _ = encode(r, default)
    assert not np.isnan(static).any() and static[1] == pytest.approx(1.0)


def test_skewed_counts_scale_on_log1p_and_round_trip():
    rng = np.random.default_rng(4)
    recs = [PatientRecord(patient_id=f"row-{i:08d}", site="s", arm=Arm(i % 2),
                          baseline={"nodes": float(np.floor(rng.lognormal(1.0, 1.2))), "age": float(rng.normal(60, 9))},
                          outcomes=Outcomes(time_to_event=100.0, event=False)) for i in range(300)]
    spec = FeatureSpec.fit(recs)
    entries = {e[0]: e for e in spec.numeric}
    assert entries["nodes"][3:] == (True,) and len(entries["age"]) == 3  # symmetric age stays linear
    assert FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).fingerprint() == spec.fingerprint()
    _, centre, scale, _ = entries["nodes"]
    big = recs[0].model_copy(update={"baseline": {"nodes": 40.0, "age": 60.0}})
    static, _, _ = encode(big, spec)
    assert static[0] == pytest.approx((math.log1p(40.0) - centre) / scale)  # log1p axis, not clipped at 6 sd
