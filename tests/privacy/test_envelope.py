import pytest

from evoclone.privacy.envelope import TamperedError, new_key, open_sealed, rewrap, seal, unwrap, wrap


def test_seal_open_roundtrip_and_tamper_detection():
    k = new_key()
    blob = seal(b"record", data_key=k, context=b"P-1")
    assert b"record" not in blob
    assert open_sealed(blob, data_key=k, context=b"P-1") == b"record"
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    for bad in (bytes(flipped), blob[:20]):
        with pytest.raises(TamperedError):
            open_sealed(bad, data_key=k, context=b"P-1")
    with pytest.raises(TamperedError, match="moved"):
        open_sealed(blob, data_key=k, context=b"P-2")
    with pytest.raises(TamperedError):
        open_sealed(blob, data_key=new_key(), context=b"P-1")


def test_wrap_unwrap_rewrap():
    data, m1, m2 = new_key(), new_key(), new_key()
    w = wrap(data, master_key=m1, master_id="k1")
    assert unwrap(w, master_key=m1) == data
    with pytest.raises(TamperedError, match="k1"):
        unwrap(w, master_key=m2)
    w2 = rewrap(w, old_master=m1, new_master=m2, new_id="k2")
    assert w2.master_id == "k2" and unwrap(w2, master_key=m2) == data
    with pytest.raises(ValueError):
        wrap(b"short", master_key=m1, master_id="k1")
