from datetime import date, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evoclone.privacy.pseudonym import Pseudonymizer, age_at, zip3

KEY_A = b"a" * 32
KEY_B = b"b" * 32


def test_same_identifier_and_key_give_same_pseudonym():
    assert Pseudonymizer(key=KEY_A).pseudonym("MRN00000001") == Pseudonymizer(key=KEY_A).pseudonym("MRN00000001")


def test_different_key_gives_different_pseudonym():
    assert Pseudonymizer(key=KEY_A).pseudonym("MRN00000001") != Pseudonymizer(key=KEY_B).pseudonym("MRN00000001")


def test_pseudonym_does_not_contain_identifier_and_kinds_are_separated():
    p = Pseudonymizer(key=KEY_A)
    pid = p.pseudonym("MRN12345678")
    assert "12345678" not in pid and pid.startswith("P-") and len(pid) == 34
    assert p.pseudonym("MRN12345678", kind="encounter") != pid


@settings(max_examples=200, deadline=None)
@given(ident=st.text(min_size=1, max_size=40), key_a=st.binary(min_size=32, max_size=64),
       key_b=st.binary(min_size=32, max_size=64))
def test_pseudonyms_stable_per_key_and_differ_across_keys(ident, key_a, key_b):
    a1, a2 = Pseudonymizer(key=key_a), Pseudonymizer(key=key_a)
    assert a1.pseudonym(ident) == a2.pseudonym(ident)
    if key_a != key_b:
        assert a1.pseudonym(ident) != Pseudonymizer(key=key_b).pseudonym(ident)


@settings(max_examples=200, deadline=None)
@given(ident=st.text(min_size=1, max_size=20), d1=st.dates(date(1900, 1, 1), date(2090, 1, 1)),
       gap=st.integers(-3000, 3000))
def test_date_shift_is_per_patient_constant_and_keeps_intervals(ident, d1, gap):
    p = Pseudonymizer(key=KEY_A)
    d2 = d1 + timedelta(days=gap)
    assert (p.shift(d2, ident) - p.shift(d1, ident)).days == gap
    offset = p.date_offset(ident)
    assert offset != 0 and abs(offset) <= p.max_shift_days


def test_short_key_rejected_and_repr_hides_key():
    with pytest.raises(ValueError, match="at least 32"):
        Pseudonymizer(key=b"short")
    assert "a" * 32 not in repr(Pseudonymizer(key=KEY_A))


def test_age_top_coded_and_zip_truncated():
    assert age_at(date(1950, 6, 2), date(2020, 6, 1)) == 69
    assert age_at(date(1920, 1, 1), date(2020, 1, 1)) == 90
    with pytest.raises(ValueError):
        age_at(date(2021, 1, 1), date(2020, 1, 1))
    assert zip3("02139-1234") == "021"
    assert zip3("82301") == "000" and zip3("69201") == "000"  # sparsely populated areas are suppressed
    with pytest.raises(ValueError):
        zip3("12")
