import numpy as np
import pandas as pd
import pytest
from lifelines.datasets import load_gbsg2

from evoclone.federated.features import FeatureSpec, encode_cohort
from evoclone.federated.record import Arm
from evoclone.federated.simulator import simulate_cohort
from evoclone.federated.tabular import OutcomeColumns, records_from_frames

TTE = OutcomeColumns(time="time", event="event")


def _frame(n=6, **cols):
    base = {"pid": [f"MRN{i:05d}" for i in range(n)], "arm": [0, 1] * (n // 2),
            "age": np.linspace(40, 80, n), "sex": ["F", "M"] * (n // 2),
            "time": np.arange(1, n + 1) * 100.0, "event": [1, 0] * (n // 2)}
    base.update(cols)
    return pd.DataFrame(base)


def _events(rows):
    return pd.DataFrame(rows, columns=["patient_id", "time", "code", "value", "unit"])


def _load(patients, events=None, **kw):
    kw = {"treatment": "arm", "outcome": TTE, "covariates": None, "id_column": "pid", "source": "p.csv",
          "events_source": "e.csv", **kw}
    return records_from_frames(patients, events, **kw)


def _error(fn, *fragments):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    assert "MRN" not in msg  # raw ids never reach an error
    return msg


def test_gbsg2_to_records_to_fitted_spec_to_arrays():
    d = load_gbsg2()
    data = records_from_frames(d, None, treatment="horTh", outcome=OutcomeColumns(time="time", event="cens"),
                               covariates=None, source="gbsg2.csv")
    assert data.covariates == ["age", "menostat", "tsize", "tgrade", "pnodes", "progrec", "estrec"]
    assert data.arm_levels == {"no": Arm.CONTROL, "yes": Arm.TREATMENT}
    assert data.endpoint == "time_to_event" and data.missing_outcome == 0
    assert data.row_ids == list(range(len(d)))
    r = data.records[1]
    assert r.arm == Arm.TREATMENT and r.patient_id == "row-00000001"
    assert r.baseline["age"] == 56.0 and r.baseline["tgrade"] == "II"
    assert r.outcomes.time_to_event == 2018.0 and r.outcomes.event is True
    assert sum(x.arm == Arm.TREATMENT for x in data.records) == int((d.horTh == "yes").sum())

    spec = FeatureSpec.fit(data.records, covariates=data.covariates)
    assert [n for n, *_ in spec.numeric] == ["age", "tsize", "pnodes", "progrec", "estrec"]
    assert {n for n, *rest in spec.numeric if rest[2:]} == {"tsize", "pnodes", "progrec", "estrec"}  # skewed: log1p
    assert dict(spec.categorical) == {"menostat": ("Post", "Pre"), "tgrade": ("I", "II", "III")}
    assert spec.labs == ()
    arrays = encode_cohort(data.records, spec)
    n = len(d)
    assert spec.static_dim == 5 + 2 + 3 + 1
    assert arrays["static"].shape == (n, spec.static_dim) and arrays["visits"].shape == (n, 16, 2)
    assert not np.isnan(arrays["static"]).any()
    np.testing.assert_array_equal(arrays["time"], d["time"].to_numpy(np.float32))
    np.testing.assert_array_equal(arrays["event"], d["cens"].to_numpy(np.float32))
    assert arrays["static"][:, spec.feature_names()[0].index("arm")].sum() == (d.horTh == "yes").sum()


def _simulated(n=300):
    cohort = simulate_cohort(patients=n, sites=1, seed=3)
    site = next(iter(cohort.patients))
    p, ev = cohort.patients[site].copy(), cohort.events[site]
    enrol = pd.to_datetime(p["enrollment_date"])
    p["time"] = (pd.to_datetime(p["followup_end_date"]) - enrol).dt.days
    p["age"] = ((enrol - pd.to_datetime(p["birth_date"])).dt.days / 365.25).round(1)
    days = (pd.to_datetime(ev["date"]) - ev["mrn"].map(dict(zip(p["mrn"], enrol)))).dt.days
    events = pd.DataFrame({"patient_id": ev["mrn"], "time": days, "code": ev["code"], "value": ev["value"],
                           "unit": ev["unit"]})
    return p, events


COVARIATES = ["age", "sex", "bmi", "genotype", "diabetes", "hypertension", "ckd", "prior_mi"]


def test_simulator_tables_with_events():
    p, events = _simulated()
    data = records_from_frames(p, events, treatment="arm", outcome=TTE, covariates=COVARIATES, id_column="mrn",
                               site="boston")
    assert data.covariates == COVARIATES
    assert sum(len(r.events) for r in data.records) == len(events)
    first = data.records[0]
    mine = events[events["patient_id"] == p["mrn"].iloc[0]]
    assert sorted(e.time for e in first.events) == sorted(mine["time"].astype(float))
    assert first.site == "boston" and first.events[0].unit is not None
    assert all(len(r.patient_id) >= 8 and "MRN" not in r.patient_id for r in data.records)
    assert len({r.patient_id for r in data.records}) == len(p)

    spec = FeatureSpec.fit(data.records, covariates=data.covariates)
    codes = [lab[0] for lab in spec.labs]
    assert codes == sorted(["13457-7", "4548-4", "33914-3", "1988-5", "8480-6"])
    assert {lab[0]: lab[4] for lab in spec.labs}["1988-5"] is True  # CRP is log-normal
    assert {lab[0]: lab[4] for lab in spec.labs}["13457-7"] is False
    assert spec.binary == ("diabetes", "hypertension", "ckd", "prior_mi")
    arrays = encode_cohort(data.records, spec)
    assert arrays["static"].shape == (len(p), 2 + 4 + 2 + 3 + 1 + 3 * 5)  # a lab: last value, presence, trend
    assert arrays["visits"].shape == (len(p), 16, 2 + 2 * 5)
    assert arrays["lengths"].min() >= 1 and arrays["lengths"].mean() > 5
    assert not np.isnan(arrays["visits"]).any() and not np.isnan(arrays["static"]).any()


def test_blank_outcomes_are_kept_and_counted():
    p, _ = _simulated(120)
    data = records_from_frames(p, None, treatment="arm", outcome=OutcomeColumns(binary="response_wk24"),
                               covariates=["age", "bmi"], id_column="mrn")
    blank = int(p["response_wk24"].isna().sum())
    assert blank > 0 and data.missing_outcome == blank and data.endpoint == "binary"
    assert len(data.records) == len(p)
    assert sum(r.outcomes.binary is None for r in data.records) == blank
    cont = records_from_frames(p, None, treatment="arm", outcome=OutcomeColumns(continuous="ldl_wk24"),
                               covariates=["age"], id_column="mrn")
    assert cont.missing_outcome == int(p["ldl_wk24"].isna().sum())
    tte = _load(_frame(time=[1.0, np.nan, 3.0, 4.0, 5.0, 6.0], event=[1, 1, np.nan, 0, 1, 0]))
    assert tte.missing_outcome == 2 and tte.records[1].outcomes.time_to_event is None


def test_covariate_types_and_defaults():
    data = _load(_frame(score=[1.0, np.nan, 3.0, 4.0, 5.0, 6.0], grade=["a", None, "b", "a", "b", "a"]))
    assert data.covariates == ["age", "sex", "score", "grade"]  # id, arm, time, event left out
    b = data.records[1].baseline
    assert b["score"] is None and b["grade"] is None and isinstance(b["age"], float) and b["sex"] == "M"
    assert data.records[0].baseline["grade"] == "a"
    # a column named patient_id is the id column even when not named
    auto = records_from_frames(_frame().rename(columns={"pid": "patient_id"}), None, treatment="arm",
                               outcome=TTE, covariates=None)
    assert "patient_id" not in auto.covariates and auto.records[0].patient_id.startswith("id-")


@pytest.mark.parametrize("values,expected", [
    (["No", "YES", "no", "yes"], {"No": 0, "YES": 1, "no": 0, "yes": 1}),
    (["Placebo", "ACTIVE"] * 2, {"Placebo": 0, "ACTIVE": 1}),
    ([0.0, 1.0] * 2, {0.0: 0, 1.0: 1}),
    ([True, False] * 2, {True: 1, False: 0}),
    (["B", "A"] * 2, {"A": 0, "B": 1}),  # unknown labels: sorted order
    (["drugX", "control"] * 2, {"drugX": 1, "control": 0}),  # one known label fixes the other
    (["treated"] * 4, {"treated": 1}),
])
def test_treatment_labels_map_to_arms(values, expected):
    data = _load(_frame(n=4, arm=values))
    assert {k: int(v) for k, v in data.arm_levels.items()} == expected
    assert [int(r.arm) for r in data.records] == [expected[v] for v in values]


def test_treatment_none_leaves_arm_unset():
    data = records_from_frames(_frame().drop(columns=["arm"]), None, treatment=None, outcome=None, covariates=None,
                               id_column="pid")
    assert all(r.arm is None for r in data.records) and data.arm_levels == {} and data.endpoint is None
    assert "time" in data.covariates  # no outcome named: every other column is a covariate


def test_bad_treatment_columns():
    _error(lambda: _load(_frame(arm=["a", "b", "c", "a", "b", "c"])),
           "p.csv: column 'arm' has 3 values (a, b, c); the treatment column must have two arms")
    _error(lambda: _load(_frame(arm=[0, 1, None, 0, 1, 0])), "p.csv row 2 column 'arm'", "treatment is missing")
    _error(lambda: _load(_frame(arm=["x"] * 6)), "column 'arm' has 1 value (x)")


def test_ids():
    data = _load(_frame())
    assert data.records[0].patient_id == _load(_frame()).records[0].patient_id
    assert len(data.records[0].patient_id) >= 8
    assert records_from_frames(_frame(), None, treatment="arm", outcome=TTE, covariates=["age"]
                               ).records[3].patient_id == "row-00000003"
    dup = _frame(pid=["MRN1", "MRN2", "MRN3", "MRN2", "MRN5", "MRN6"])
    _error(lambda: _load(dup), "p.csv row 3 column 'pid': duplicate id (first in row 1)")
    _error(lambda: _load(_frame(pid=["MRN1", None, "MRN3", "MRN4", "MRN5", "MRN6"])), "row 1 column 'pid'", "missing")


def test_events_join_and_bad_events():
    p = _frame()
    ok = _load(p, _events([["MRN00001", -30, "x", 1.5, "mg"], ["MRN00001", 10, "y", None, None]]))
    assert [e.code for e in ok.records[1].history(until=100)] == ["x", "y"]
    assert ok.records[1].events[1].value is None and ok.records[0].events == ()
    # ids typed differently in the two files still join
    numeric = _load(_frame(pid=list(range(100, 106))), _events([[101.0, 0, "x", 1, "u"]]))
    assert len(numeric.records[1].events) == 1
    _error(lambda: _load(p, _events([["MRN00001", 0, "x", 1, "u"], ["MRN99999", 0, "x", 1, "u"]])),
           "e.csv row 1 column 'patient_id': id not in the patients table")
    _error(lambda: _load(p, _events([["MRN00001", np.nan, "x", 1, "u"]])), "e.csv row 0 column 'time'")
    _error(lambda: _load(p, _events([["MRN00001", 0, "x", 1, "u"], ["MRN00001", np.inf, "x", 1, "u"]])),
           "e.csv row 1 column 'time'")
    _error(lambda: _load(p, _events([["MRN00001", "soon", "x", 1, "u"]])), "e.csv row 0 column 'time'", "not a number")
    _error(lambda: _load(p, _events([["MRN00001", 0, " ", 1, "u"]])), "e.csv row 0 column 'code'", "blank")
    _error(lambda: _load(p, _events([["MRN00001", 0, "x", "high", "u"]])), "e.csv row 0 column 'value'", "not a number")
    _error(lambda: _load(p, _events([["MRN00001", 0, "x", np.inf, "u"]])), "e.csv row 0 column 'value'", "infinite")
    _error(lambda: _load(p, pd.DataFrame({"patient_id": ["MRN00001"], "time": [0]})),
           "e.csv: column(s) 'code' not found; columns present: patient_id, time")
    _error(lambda: records_from_frames(p, _events([["MRN00001", 0, "x", 1, "u"]]), treatment="arm", outcome=TTE,
                                       covariates=None), "events need a patient id")


@pytest.mark.parametrize("cols,outcome,fragments", [
    ({"time": [1, 2, -3, 4, 5, 6]}, TTE, ("p.csv row 2 column 'time'", ">= 0")),
    ({"time": [1, 2, 3, np.inf, 5, 6]}, TTE, ("p.csv row 3 column 'time'", "finite")),
    ({"time": [1, 2, 3, 4, "later", 6]}, TTE, ("p.csv row 4 column 'time'", "not a number")),
    ({"event": [1, 0, 2, 0, 1, 0]}, TTE, ("p.csv row 2 column 'event'", "0 or 1")),
    ({"y": [1, 0, 1, 0, 1, 3]}, OutcomeColumns(binary="y"), ("p.csv row 5 column 'y'", "0 or 1")),
    ({"y": [1.0, -np.inf, 1, 0, 1, 3]}, OutcomeColumns(continuous="y"), ("p.csv row 1 column 'y'", "infinite")),
    ({"age": [50, 60, 70, np.inf, 60, 60]}, TTE, ("p.csv row 3 column 'age'", "infinite")),
])
def test_bad_values_name_row_and_column(cols, outcome, fragments):
    _error(lambda: _load(_frame(**cols), outcome=outcome), *fragments)


def test_bad_columns_and_endpoints():
    _error(lambda: _load(_frame(), covariates=["age", "weight"]),
           "p.csv: column(s) 'weight' not found; columns present: pid, arm, age, sex, time, event")
    _error(lambda: _load(_frame(), treatment="group"), "'group' not found", "columns present")
    _error(lambda: _load(_frame(), covariates=["age", "arm"]), "column 'arm' is the id, treatment or outcome column")
    _error(lambda: _load(_frame().iloc[:0]), "p.csv: no rows")
    _error(lambda: OutcomeColumns(time="time"), "needs both a time column and an event column")
    _error(lambda: OutcomeColumns(binary="a", continuous="b"), "exactly one endpoint")
    _error(lambda: OutcomeColumns(), "exactly one endpoint")
    assert OutcomeColumns(continuous="y").endpoint == "continuous" and TTE.columns == ("time", "event")
