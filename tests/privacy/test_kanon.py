from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evoclone.privacy.kanon import anonymize, measure

TABLE = [  # hand-checked: classes (34,F,021)x2, (36,F,021)x1, (71,M,606)x3
    {"age": 34, "sex": "F", "zip3": "021", "dx": "a"},
    {"age": 34, "sex": "F", "zip3": "021", "dx": "b"},
    {"age": 36, "sex": "F", "zip3": "021", "dx": "a"},
    {"age": 71, "sex": "M", "zip3": "606", "dx": "a"},
    {"age": 71, "sex": "M", "zip3": "606", "dx": "a"},
    {"age": 71, "sex": "M", "zip3": "606", "dx": "a"},
]


def test_measure_on_a_hand_checked_table():
    r = measure(TABLE, ["age", "sex", "zip3"], k=2, sensitive="dx")
    assert (r.equivalence_classes, r.min_class_size, r.records_below_k) == (3, 1, 1)
    assert r.min_l == 1 and r.classes_below_l == 2  # (36,F) and (71,M) have one diagnosis each


def test_generalization_reaches_k_on_the_hand_checked_table():
    # 5-year bands still leave 36 alone (35-39); 10-year bands merge 34 and 36
    released, r = anonymize(TABLE, ["age", "sex", "zip3"], k=3, max_suppression=0.0)
    assert r.generalization == {"age": "10-year bands", "sex": "exact", "zip3": "3 digits"}
    assert r.suppressed == 0 and r.min_class_size == 3 and r.equivalence_classes == 2
    assert sorted({x["age"] for x in released}) == ["30-39", "70-79"]


def test_suppression_within_the_cap_instead_of_generalizing():
    released, r = anonymize(TABLE, ["age"], k=2, max_suppression=0.2)
    assert r.generalization == {"age": "exact"} and r.suppressed == 1
    assert [x["age"] for x in released] == [34, 34, 71, 71, 71]


def test_everything_suppressed_when_k_exceeds_the_table():
    released, r = anonymize(TABLE, ["sex"], k=7)
    assert released == [] and r.suppressed == 6 and r.generalization == {"sex": "suppressed"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.fixed_dictionaries({"age": st.integers(18, 99), "sex": st.sampled_from("FM"),
                                       "zip3": st.sampled_from(["021", "022", "606", "981"])}),
                min_size=1, max_size=80),
       st.integers(2, 6), st.floats(0, 0.5))
def test_every_released_class_has_at_least_k_records(rows, k, cap):
    released, report = anonymize(rows, ["age", "sex", "zip3"], k=k, max_suppression=cap)
    counts = Counter((r["age"], r["sex"], r["zip3"]) for r in released)
    assert all(c >= k for c in counts.values())
    assert report.suppressed == len(rows) - len(released)
    assert report.suppressed <= len(rows)


def test_bad_parameters():
    with pytest.raises(ValueError):
        measure(TABLE, ["age"], k=0)
    with pytest.raises(ValueError):
        anonymize(TABLE, ["age"], max_suppression=1.0)
