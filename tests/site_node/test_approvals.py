"""App approvals by FAB hash in the site's database (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest

from evoclone.site_node.approvals import ApprovalStore

H = "ab" * 32


def test_approve_revoke_and_refusals_are_recorded(db_url):
    store = ApprovalStore(url=db_url)
    assert not store.is_approved(H)
    store.approve(H.upper(), admin="dr steward", note="reviewed v0.2")
    store.approve(H, admin="dr steward")  # idempotent
    assert store.is_approved(H) and [a["fab_hash"] for a in store.list()] == [H]
    store.log_refusal(run_id="7", fab_hash="cd" * 32, fab_id="evil/app")
    assert store.refused()[0]["fab_id"] == "evil/app"
    store.revoke(H, admin="dr steward", note="withdrawn")
    assert not store.is_approved(H)
    assert [d["action"] for d in store.history()] == ["approve", "approve", "revoke"]
    with pytest.raises(ValueError, match="not approved at this site"):
        store.revoke(H, admin="dr steward")
    store.close()


def test_bad_hash_and_missing_admin_are_refused(db_url):
    store = ApprovalStore(url=db_url)
    with pytest.raises(ValueError, match="not a sha256"):
        store.approve("deadbeef", admin="x")
    with pytest.raises(ValueError, match="administrator's name"):
        store.approve(H, admin=" ")
    assert store.list() == [] and store.history() == []
    store.close()
