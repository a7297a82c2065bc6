import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines.utils import concordance_index

from evoclone.federated.metrics import c_index, risk_groups


@settings(max_examples=100, deadline=None)
@given(st.integers(10, 300), st.integers(0, 2**31 - 1))
def test_c_index_matches_lifelines_to_the_digit(n, seed):
    rng = np.random.default_rng(seed)
    t = rng.integers(1, 40, n).astype(float)  # many tied times
    e = (rng.random(n) < 0.5).astype(float)
    r = rng.integers(0, 6, n).astype(float)  # many tied risks
    try:
        ref = concordance_index(t, -r, e)
    except ZeroDivisionError:
        assert np.isnan(c_index(t, e, r))
        return
    assert c_index(t, e, r, chunk=7) == pytest.approx(ref, abs=1e-12)


def test_c_index_extremes():
    t = np.arange(1.0, 11.0)
    e = np.ones(10)
    assert c_index(t, e, -t) == 1.0
    assert c_index(t, e, t) == 0.0
    assert np.isnan(c_index(t, np.zeros(10), t))


def test_risk_groups_tertiles():
    g = risk_groups(np.arange(9.0), 3)
    assert list(np.bincount(g)) == [3, 3, 3] and g[0] == 0 and g[-1] == 2
