import hashlib
import json
import re

import numpy as np
import pytest

from evoclone.federated.simulator import (HAZARD_RATIO, LDL_SHIFT_MG_DL, RESPONSE_RISK_RATIO, simulate_cohort,
                                          write_cohort)


def _digest(path):
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    write_cohort(simulate_cohort(patients=90, sites=3, seed=5), tmp_path / "a")
    write_cohort(simulate_cohort(patients=90, sites=3, seed=5), tmp_path / "b")
    write_cohort(simulate_cohort(patients=90, sites=3, seed=6), tmp_path / "c")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a")["site-1/patients.csv"] != _digest(tmp_path / "c")["site-1/patients.csv"]


def test_extract_carries_realistic_identifiers(small_cohort):
    cohort, out = small_cohort
    pat = cohort.patients["site-1"]
    assert pat["mrn"].str.fullmatch(r"MRN\d{8}").all()
    assert set(("name", "birth_date", "zip", "phone")) <= set(pat.columns)
    assert pat["phone"].str.fullmatch(r"\d{3}-555-\d{4}").all() and pat["zip"].str.fullmatch(r"\d{5}").all()
    all_mrns = np.concatenate([p["mrn"].to_numpy() for p in cohort.patients.values()])
    assert len(set(all_mrns)) == len(all_mrns) == 240
    truth = json.loads((out / "ground_truth.json").read_text())
    assert truth["effects"]["hazard_ratio"] == HAZARD_RATIO and len(truth["sites"]) == 3
    assert {"site-1", "site-2", "site-3"} == {p.name for p in out.iterdir() if p.is_dir()}
    ev = cohort.events["site-2"]
    assert set(ev["mrn"]) <= set(cohort.patients["site-2"]["mrn"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", ev["date"].iloc[0])


def test_sites_are_not_iid(small_cohort):
    cohort, _ = small_cohort
    visits = {s: e.groupby("mrn")["date"].nunique().mean() for s, e in cohort.events.items()}
    ages = {s: (p["enrollment_date"].str[:4].astype(int) - p["birth_date"].str[:4].astype(int)).mean()
            for s, p in cohort.patients.items()}
    assert visits["site-1"] > 1.5 * visits["site-3"]  # visit frequency differs
    assert ages["site-3"] > ages["site-1"] + 5  # case mix differs


@pytest.fixture(scope="module")
def big():
    return simulate_cohort(patients=6000, sites=3, seed=1)


def test_ground_truth_effects_are_recovered(big):
    from lifelines import CoxPHFitter

    import pandas as pd

    pat = pd.concat(big.patients.values(), ignore_index=True)
    t = (pd.to_datetime(pat["followup_end_date"]) - pd.to_datetime(pat["enrollment_date"])).dt.days
    # randomisation makes the arm-only hazard ratio a consistent estimate of the marginal
    # effect; with strong prognostic factors it is attenuated toward 1 (non-collapsibility),
    # so the check adjusts for the true linear predictor
    lp = np.array([p["log_hazard_without_arm"] for p in big.truth["patient_truth"]])
    df = pd.DataFrame({"t": t, "e": pat["event"], "arm": pat["arm"], "lp": lp})
    cph = CoxPHFitter().fit(df, "t", "e")
    assert cph.hazard_ratios_["arm"] == pytest.approx(HAZARD_RATIO, abs=0.07)
    assert 0.9 < cph.params_["lp"] < 1.1
    ldl = pat.dropna(subset=["ldl_wk24"])
    shift = ldl[ldl.arm == 1]["ldl_wk24"].mean() - ldl[ldl.arm == 0]["ldl_wk24"].mean()
    assert shift == pytest.approx(LDL_SHIFT_MG_DL, abs=3.0)
    resp = pat.dropna(subset=["response_wk24"])
    rr = resp[resp.arm == 1]["response_wk24"].mean() / resp[resp.arm == 0]["response_wk24"].mean()
    assert rr == pytest.approx(RESPONSE_RISK_RATIO, abs=0.15)


def test_censoring_present_and_bad_arguments_rejected(big):
    pat = big.patients["site-1"]
    assert 0.1 < pat["event"].mean() < 0.9
    with pytest.raises(ValueError):
        simulate_cohort(patients=2, sites=3, seed=0)


def test_simulated_labs_pass_site_validation(big):
    import pandas as pd

    from evoclone.site_node.units import normalize

    ev = pd.concat(big.events.values())
    for code, unit, value in ev[["code", "unit", "value"]].drop_duplicates(["code", "unit"]).itertuples(index=False):
        normalize(code, value, unit)
    for code, g in ev.groupby("code"):
        lo, hi = g["value"].min(), g["value"].max()
        normalize(code, lo, g["unit"].iloc[0])
        normalize(code, hi, g["unit"].iloc[0])
