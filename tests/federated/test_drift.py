"""Drift statistics (PSI, KS, MMD, missingness, outcome rates), small-cell suppression, and the report payloads."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scipy.stats import ks_2samp

from evoclone.federated.drift import (categorical_drift, ks_statistic, merge_small_cells, mmd_rbf, numeric_drift,
                                      outcome_rate, pool_rare_levels, psi, share)
from evoclone.federated.payloads import (MIN_COUNT, ComplianceSelfCheck, DriftFeature, DriftReport, canonical_bytes,
                                         identifier_kind, round_count)

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_psi_matches_the_formula_and_stays_finite_for_empty_cells():
    assert psi([10, 20, 30], [10, 20, 30]) == 0
    p, q = np.array([50, 50]) / 100, np.array([20, 80]) / 100
    assert psi([50, 50], [20, 80]) == pytest.approx(float(np.sum((q - p) * np.log(q / p))))
    new_level = psi([100, 0], [50, 50])
    assert math.isfinite(new_level) and new_level > 1
    with pytest.raises(ValueError, match="same length"):
        psi([1, 2], [1, 2, 3])


def test_ks_equals_scipy_and_mmd_separates_shifted_samples():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 300), rng.normal(0.8, 1, 250)
    assert ks_statistic(a, b) == pytest.approx(ks_2samp(a, b).statistic)
    same = mmd_rbf(a, rng.normal(0, 1, 300))
    shifted = mmd_rbf(a, b)
    assert 0 <= same < 0.01 < shifted
    assert mmd_rbf(a, b) == shifted  # seeded: the same answer every time
    big = rng.normal(0, 1, 20_000)  # subsampled to a bounded kernel matrix
    assert mmd_rbf(big, big + 1, max_samples=200) > 0.05
    assert mmd_rbf([3.0] * 50, [3.0] * 40) == 0  # all ties: a defined bandwidth, no NaN


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=12),
       st.integers(1, 15))
def test_merged_cells_never_hold_1_to_min_count_minus_1_patients(cells, min_count):
    ref, cur = [r for r, _ in cells], [c for _, c in cells]
    r, c, merges = merge_small_cells(ref, cur, min_count=min_count)
    assert sum(r) == sum(ref) and sum(c) == sum(cur)
    if len(r) > 1:
        assert not any(0 < x < min_count for x in r + c)
    assert merges <= len(cells)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 40), max_size=8),
       st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 40), max_size=8))
def test_pooled_levels_never_hold_a_small_cell_unless_nothing_else_is_left(ref, cur):
    r, c, pooled = pool_rare_levels(ref, cur, min_count=MIN_COUNT)
    assert sum(r) == sum(ref.values()) and sum(c) == sum(cur.values())
    if len(r) > 1:
        assert not any(0 < x < MIN_COUNT for x in r + c)


def test_numeric_drift_flags_a_shift_and_suppresses_small_samples_and_cells():
    rng = np.random.default_rng(2)
    ref = list(rng.normal(60, 10, 400))
    cur = list(rng.normal(70, 10, 300))
    f = numeric_drift("age", ref, cur)
    assert f.psi > 0.2 and f.ks > 0.3 and f.mmd > 0 and not f.suppressed
    assert 2 <= f.cells <= 10 and f.missing_rate == 0 and f.reference_missing_rate == 0
    assert numeric_drift("age", ref, list(rng.normal(60, 10, 300))).psi < 0.1
    tiny = numeric_drift("age", ref, ref[: MIN_COUNT - 1])
    assert tiny.suppressed and tiny.psi is tiny.ks is tiny.mmd is None
    # 5 missing of 200: a small cell, so the rate is withheld; 50 of 200 is reported
    assert numeric_drift("age", ref, [None] * 5 + ref[:195]).missing_rate is None
    assert numeric_drift("age", ref, [None] * 50 + ref[:150]).missing_rate == 0.25
    # three patients in the reference's top decile merge into the next bin instead of forming a cell of 3
    top = float(np.quantile(ref, 0.9))
    outliers = numeric_drift("age", ref, [v for v in ref if v < top][:300] + [top + 1, top + 2, top + 3])
    assert outliers.suppressed_cells >= 1 and outliers.cells <= 9


def test_categorical_drift_pools_rare_levels_and_sees_a_new_frequent_one():
    ref = ["F"] * 100 + ["M"] * 100 + ["X"] * 3
    cur = ["F"] * 100 + ["M"] * 100 + ["X"] * 2
    f = categorical_drift("sex", ref, cur)
    assert f.psi < 0.01 and f.suppressed_cells == 1 and f.cells == 2 and f.ks is None and f.mmd is None
    new = categorical_drift("sex", ref, ["F"] * 100 + ["M"] * 50 + ["U"] * 50)
    assert new.psi > 1
    assert categorical_drift("sex", ["F"] * 5, cur).suppressed


def test_outcome_rates_and_shares_are_withheld_for_small_cells():
    assert share(0, 100) == 0 and share(30, 100) == 0.3
    assert share(3, 100) is None and share(97, 100) is None
    r = outcome_rate("binary", [1] * 30 + [0] * 70, [1] * 50 + [0] * 50 + [None] * 7)
    assert (r.reference, r.current, r.suppressed) == (0.3, 0.5, False)
    few = outcome_rate("event", [1] * 3 + [0] * 97, [1] * 50 + [0] * 50)
    assert few.reference is None and few.suppressed


def _report(**kw) -> dict:
    doc = {"site": "site-a", "sent_at": NOW.isoformat(), "reference_id": "ab" * 16, "reference_count": 200,
           "current_count": 150, "features": [{"name": "age", "kind": "numeric", "psi": 0.1, "ks": 0.2,
                                               "mmd": 0.01, "cells": 10}]}
    return {**doc, **kw}


def test_drift_report_schema_is_closed_strict_and_bounded():
    ok = DriftReport.model_validate_json(json.dumps(_report()))
    assert ok.features[0].name == "age"
    bad = [
        _report(current_count=153),  # counts leave rounded to tens
        _report(extra="x"),
        _report(features=[{"name": "age", "kind": "numeric", "psi": "0.1"}]),  # strict: no strings for numbers
        _report(features=[{"name": "age", "kind": "numeric", "rows": [1, 2]}]),
        _report(features=[{"name": "age", "kind": "numeric"}] * 2),
        _report(features=[{"name": f"f{i}", "kind": "numeric"} for i in range(513)]),
        _report(features=[{"name": "has space", "kind": "numeric"}]),
        _report(features=[{"name": "age", "kind": "numeric", "ks": 1.5}]),
    ]
    for doc in bad:
        with pytest.raises(ValidationError):
            DriftReport.model_validate_json(json.dumps(doc))


def test_counts_identifiers_and_canonical_bytes():
    assert [round_count(n) for n in (0, 4, 5, 14, 15, 996)] == [0, 0, 10, 10, 20, 1000]
    for text, kind in [("MRN-CANARY-7731", "medical record number"), ("jane@example.org", "email"),
                       ("123-45-6789", "ssn"), ("1961-04-12", "date"), ("dob", "date of birth"),
                       ("patient_name", "name")]:
        assert identifier_kind(text) == kind
    for label in ("age", "lab:13457-7", "lab:4548-4", "hba1c", "prior_mi", "genotype", "site-a"):
        assert identifier_kind(label) is None
    r = DriftReport.model_validate_json(json.dumps(_report()))
    signed = r.model_copy(update={"signature": "0" * 128})
    assert canonical_bytes(r) == canonical_bytes(signed) and b"signature" not in canonical_bytes(r)


def test_a_self_check_reports_every_check_exactly_once():
    checks = [{"id": i, "passed": True, "reason": "ok"} for i in
              ("encryption_at_rest", "transport_tls", "privacy_budget", "audit_chain", "retention", "approved_apps")]
    doc = {"site": "site-a", "sent_at": NOW.isoformat(), "checks": checks, "key_fingerprint": "a" * 64,
           "signature": "b" * 128}
    ComplianceSelfCheck.model_validate_json(json.dumps(doc))
    for broken in (checks[:-1], checks[:-1] + checks[:1], checks[:-1] + [{**checks[-1], "reason": "all good!"}]):
        with pytest.raises(ValidationError):
            ComplianceSelfCheck.model_validate_json(json.dumps({**doc, "checks": broken}))
    with pytest.raises(ValidationError):
        ComplianceSelfCheck.model_validate_json(json.dumps({k: v for k, v in doc.items() if k != "signature"}))
    with pytest.raises(ValidationError):
        DriftFeature(name="age", kind="numeric", psi=float("nan"))
