"""The site's privacy ledger in SQL: survives reopening, charges each round once, enforces the budget."""

import pytest
from opacus.accountants import RDPAccountant

from evoclone.federated.stores.ledger import LedgerMismatchError, SqlLedgerStore
from evoclone.privacy.accounting import LedgerEntry


def test_charges_persist_and_match_the_opacus_accountant(db_url):
    store = SqlLedgerStore(url=db_url)
    ledger = store.open(epsilon_budget=3.0, delta=1e-5)
    assert ledger.spent() == 0.0 and store.plan(run_id="7") is None
    assert store.set_plan(run_id="7", noise_multiplier=2.0) == 2.0
    assert store.set_plan(run_id="7", noise_multiplier=9.9) == 2.0  # the first plan wins
    for r in (1, 2):
        store.charge(LedgerEntry(run_id="7", round=r, noise_multiplier=2.0, sample_rate=0.05, steps=20))
    store.close()
    reopened = SqlLedgerStore(url=db_url)
    ledger = reopened.open(epsilon_budget=3.0, delta=1e-5)
    acc = RDPAccountant()
    acc.history = [(2.0, 0.05, 40)]
    assert ledger.spent() == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert reopened.plan(run_id="7") == 2.0
    summary = reopened.summary()
    assert [c["round"] for c in summary["charges"]] == [1, 2]
    assert summary["epsilon_spent"] == pytest.approx(ledger.spent(), abs=1e-6)
    reopened.close()


def test_a_round_is_charged_once_and_the_budget_is_enforced(db_url):
    store = SqlLedgerStore(url=db_url)
    store.open(epsilon_budget=1.0, delta=1e-5)
    e = LedgerEntry(run_id="1", round=1, noise_multiplier=3.0, sample_rate=0.05, steps=10)
    first = store.charge(e)
    assert store.charge(e) == first  # a retried round: same total, no second row
    assert len(store.summary()["charges"]) == 1
    big = LedgerEntry(run_id="1", round=2, noise_multiplier=0.3, sample_rate=0.5, steps=500)
    with pytest.raises(ValueError, match="exceed"):
        store.charge(big)
    assert len(store.summary()["charges"]) == 1  # nothing written
    store.close()


def test_the_budget_cannot_be_changed_by_configuration(tmp_path):
    store = SqlLedgerStore(url=f"sqlite:///{tmp_path / 'a.db'}")
    assert store.stored() is None
    store.open(epsilon_budget=3.0, delta=1e-5)
    with pytest.raises(LedgerMismatchError, match="fixed once"):
        store.open(epsilon_budget=30.0, delta=1e-5)
    assert store.stored().epsilon_budget == 3.0  # the stored budget stands
    with pytest.raises(ValueError):
        SqlLedgerStore(url=f"sqlite:///{tmp_path / 'b.db'}").open(epsilon_budget=0.0, delta=1e-5)


def test_reset_is_audited_and_the_only_way_back(db_url):
    store = SqlLedgerStore(url=db_url)
    store.open(epsilon_budget=2.0, delta=1e-5)
    store.charge(LedgerEntry(run_id="1", round=1, noise_multiplier=3.0, sample_rate=0.05, steps=10))
    with pytest.raises(ValueError, match="name and a reason"):
        store.reset(admin=" ", reason="x")
    assert len(store.summary()["charges"]) == 1  # a refused reset changes nothing
    before = store.reset(admin="it-admin", reason="new dataset approved by the DPO")
    assert len(before["charges"]) == 1 and store.summary()["charges"] == [] and store.stored() is None
    assert store.open(epsilon_budget=4.0, delta=1e-5).epsilon_budget == 4.0  # a new budget may start
    log = store.audit_log()
    assert [(e["action"], e["admin"]) for e in log] == [("reset", "it-admin")]
    assert log[0]["before"]["charges"][0]["run_id"] == "1"
    store.close()
