"""The trial, PROCOVA and sample-size HTML reports: self-contained, escaped, and carrying the numbers."""

from __future__ import annotations

import re

import numpy as np
import pytest

from evoclone.cli.procova_report import procova_report, sample_size_report
from evoclone.cli.trial_report import _est_ci, _p, simulate_report

EFFECTS = {
    "time_to_event": ({"measure": "hazard_ratio", "estimate": 0.71, "ci_low": 0.55, "ci_high": 0.90},
                      "0.710 (95% CI 0.550–0.900)"),
    "binary": ({"measure": "risk_ratio", "estimate": 0.8, "ci_low": 0.6, "ci_high": 1.1}, "0.80 (95% CI 0.60–1.10)"),
    "continuous": ({"measure": "mean_difference", "estimate": -2.1, "ci_low": -3.3, "ci_high": -0.9},
                   "-2.10 (95% CI -3.30 to -0.90)"),
}
RISK_DIFF = {"measure": "risk_difference", "estimate": -0.05, "ci_low": -0.1, "ci_high": 0.002}
CURVE = [{"r2": r, "n_total": int(round(420 * (1 - r)))} for r in np.linspace(0.0, 0.8, 9)]


def _outcomes(endpoint: str, n: int, rng, shift: float = 0.0) -> dict[str, np.ndarray]:
    if endpoint == "time_to_event":
        return {"time": rng.exponential(800 * (1 + shift), n), "event": rng.integers(0, 2, n)}
    if endpoint == "binary":
        return {"y": (rng.random(n) < 0.4 - 0.1 * shift).astype(int)}
    return {"y": rng.normal(-2 * shift, 1, n)}


def _sim_doc(endpoint: str, *, real: bool) -> dict:
    effect, _ = EFFECTS[endpoint]
    doc = {"endpoint": endpoint, "effect": effect,
           "arms": {"0": {"label": "control", "n": 40, "events": 12}, "1": {"label": "treatment", "n": 40, "events": 9}},
           "subgroups": [{"column": "sex", "value": "<b>x", "n": 21, "measure": effect["measure"], "estimate": 0.69,
                          "ci_low": 0.48, "ci_high": 0.98},
                         {"column": "age", "value": "80+", "n": 4, "measure": effect["measure"], "estimate": None,
                          "ci_low": None, "ci_high": None, "note": "too few events"}],
           "twins_per_patient": 20, "rejected_by_quality_gate": 3, "source": "generator", "bootstrap": 200,
           "alpha": 0.05, "patients": 4, "dropped_missing": 2, "horizon_days": 1825.0,
           "model": {"dir": "model/", "sha256": "ab12cd34", "epsilon": 2.9}}
    if endpoint == "binary":
        doc["effect_difference"] = RISK_DIFF
    if real:
        doc["real"] = {"arms": {"0": {"n": 2, "events": 1}, "1": {"n": 2, "events": 1}},
                       "effect": {**effect, "estimate": 0.83, "ci_low": 0.41, "ci_high": 1.7}}
    return doc


def _check_page(text: str, svgs: int) -> None:
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    assert "<title>" in text and "class='summary'" in text and "Methods and notes" in text
    assert text.count("<svg") == text.count("</svg>") == svgs
    # self-contained: no address at all, no scripts, and every link inside an SVG points into the page
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', text))


@pytest.mark.parametrize("endpoint,svgs", [("time_to_event", 2), ("binary", 3), ("continuous", 2)])
@pytest.mark.parametrize("with_real", [True, False])
def test_simulate_report(tmp_path, endpoint, svgs, with_real):
    rng = np.random.default_rng(0)
    twins = {k: _outcomes(endpoint, 80, rng, float(k)) for k in "01"}
    real = {k: _outcomes(endpoint, 6, rng, float(k)) for k in "01"} if with_real else None
    path = tmp_path / "nested" / "trial.html"
    simulate_report(_sim_doc(endpoint, real=with_real), twins=twins, real=real, path=path)
    text = path.read_text(encoding="utf-8")
    _check_page(text, svgs)  # forest (two for binary: ratio and difference) + KM / rate bars / box plot
    assert EFFECTS[endpoint][1] in text
    assert "Twins predict a" in text and "for treatment vs control" in text
    if endpoint == "binary":
        assert "-0.050 (95% CI -0.100 to 0.002)" in text
    assert "&lt;b&gt;x" in text and "<b>x" not in text
    assert "too few events" in text
    assert "ab12cd34" in text and "epsilon = 2.9" in text and "200 resamples" in text
    assert "quality gate: 3" in text and "missing values: 2" in text
    assert ("real patients of this cohort" in text) == with_real
    if not with_real:
        assert "twins only" in text


def test_simulate_report_without_any_estimate(tmp_path):
    doc = _sim_doc("time_to_event", real=False)
    doc["effect"] = {"measure": "hazard_ratio", "estimate": None, "ci_low": None, "ci_high": None, "note": "no events"}
    doc["subgroups"] = doc["subgroups"][1:]
    doc.pop("model")
    rng = np.random.default_rng(1)
    path = tmp_path / "t.html"
    simulate_report(doc, twins={k: _outcomes("time_to_event", 10, rng) for k in "01"}, real=None, path=path)
    text = path.read_text(encoding="utf-8")
    _check_page(text, 2)
    assert "not estimable (no events)" in text and "Model: not recorded" in text


PROCOVA = {
    "continuous": ("mean_difference", -2.1, -3.3, -0.9, -2.0, -2.9, -1.1, "-2.00 (95% CI -2.90 to -1.10)"),
    "binary": ("risk_difference", -0.1, -0.18, -0.02, -0.09, -0.15, -0.03, "-0.090 (95% CI -0.150 to -0.030)"),
    "time_to_event": ("hazard_ratio", 0.7, 0.5, 0.95, 0.72, 0.56, 0.9, "0.720 (95% CI 0.560–0.900)"),
}


def _procova_doc(endpoint: str) -> dict:
    m, ue, ul, uh, ae, al, ah, _ = PROCOVA[endpoint]
    metric = {"continuous": "r2", "binary": "auroc", "time_to_event": "c_index"}[endpoint]
    return {"endpoint": endpoint,
            "unadjusted": {"measure": m, "estimate": ue, "se": 0.61, "ci_low": ul, "ci_high": uh, "p_value": 0.0006,
                           "n": 60},
            "adjusted": {"measure": m, "estimate": ae, "se": 0.48, "ci_low": al, "ci_high": ah, "p_value": 0.0123,
                         "n": 60},
            "prognostic": {"metric": metric, "value": 0.38}, "variance_reduction": 0.38,
            "sample_size_reduction": 0.36, "arms": {"0": {"n": 30}, "1": {"n": 30}}, "dropped_missing": 1,
            "model": {"dir": "m/", "sha256": "ffee0011", "epsilon": 3.0, "federated": True, "sites": 3}}


def _trial(endpoint: str, n_control: int, n_treated: int, rng) -> dict:
    arm = np.r_[np.zeros(n_control), np.ones(n_treated)].astype(int)
    n = len(arm)
    if endpoint == "continuous":
        score = rng.normal(size=n)
        return {"arm": arm, "score": score, "y": score + rng.normal(size=n)}
    score = rng.uniform(0.05, 0.95, n)
    if endpoint == "binary":
        return {"arm": arm, "score": score, "y": (rng.random(n) < score).astype(int)}
    return {"arm": arm, "score": score, "time": rng.exponential(400 / score), "event": rng.integers(0, 2, n),
            "horizon": 365.0}


@pytest.mark.parametrize("endpoint", ["continuous", "binary", "time_to_event"])
@pytest.mark.parametrize("n_control", [30, 3])
def test_procova_report(tmp_path, endpoint, n_control):
    rng = np.random.default_rng(2)
    path = tmp_path / "out" / "procova.html"
    procova_report(_procova_doc(endpoint), **_trial(endpoint, n_control, 30, rng), curve=CURVE, path=path)
    text = path.read_text(encoding="utf-8")
    _check_page(text, 3)  # forest, calibration, sample-size curve
    assert PROCOVA[endpoint][7] in text
    assert "p = 0.012" in text and "&lt;0.001" in text
    assert "38.0%" in text and "36.0%" in text and "ffee0011" in text and "across 3 sites" in text
    calibration = text[text.index("Calibration groups"):text.index("Methods and notes")]
    # ~10 patients per group at least: 30 control patients make 3 groups, 3 make one
    assert calibration.count("<tr>") - 1 == max(1, n_control // 10)


def test_procova_report_without_control_patients(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "p.html"
    procova_report(_procova_doc("continuous"), **_trial("continuous", 0, 8, rng), curve=[], path=path)
    text = path.read_text(encoding="utf-8")
    _check_page(text, 3)


def test_sample_size_report(tmp_path):
    doc = {"unadjusted": {"n_total": 394, "n_treatment": 197, "n_control": 197, "power": 0.801},
           "adjusted": {"n_total": 240, "n_treatment": 120, "n_control": 120, "power": 0.802},
           "r2": 0.4, "sample_size_reduction": 0.39, "effect": 0.3, "sd": 1.0, "power": 0.8, "alpha": 0.05,
           "ratio": 1.0, "method": "Schuler et al. 2022 <prognostic>"}
    path = tmp_path / "deep" / "ss.html"
    sample_size_report(doc, curve=CURVE, path=path)
    text = path.read_text(encoding="utf-8")
    _check_page(text, 1)
    assert "needs 240 patients instead of 394 (39.0% fewer) for 80.0% power" in text
    assert "0.801" in text and "&lt;prognostic&gt;" in text


def test_number_formats():
    assert _p(0.0006) == "<0.001" and _p(0.0123) == "0.012" and _p(None) == "n/a"
    assert _est_ci({"estimate": 0.71, "ci_low": 0.55, "ci_high": 0.9}, 95) == "0.710 (95% CI 0.550–0.900)"
    assert _est_ci({"estimate": 1.8, "ci_low": 1.2, "ci_high": 2.4}, 90) == "1.80 (90% CI 1.20–2.40)"
    assert _est_ci({"estimate": None, "note": "too few events"}, 95) == "not estimable (too few events)"
