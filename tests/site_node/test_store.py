"""The same contract runs against SQLite and the PostgreSQL server this machine runs."""


import pytest
import sqlalchemy as sa

from evoclone.federated.record import Arm, Event, Outcomes, PatientRecord
from evoclone.privacy.envelope import TamperedError
from evoclone.site_node.keyring import create_keyring, load_keyring
from evoclone.site_node.pipeline import ingest_extract, open_store, rotate_master_key
from evoclone.site_node.settings import get_settings
from evoclone.site_node.store import SiteStore

from ..concurrency import upgraded_at_once

def _record(pid="P-" + "a" * 32, value=1.0):
    return PatientRecord(patient_id=pid, site="s", baseline={"age": 70.0, "sex": "F"}, arm=Arm.TREATMENT,
                         events=(Event(time=-30, code="13457-7", value=value, unit="mg/dL"),),
                         outcomes=Outcomes(time_to_event=100, event=True))


@pytest.fixture
def store(db_url, tmp_path):
    ring = create_keyring(tmp_path)
    s = SiteStore(url=db_url, keyring=ring, mac_key=b"m" * 32)
    yield s
    s.close()


def test_roundtrip_idempotence_and_update(store):
    assert store.upsert_records(records=[_record(), _record("P-" + "b" * 32)]) == 2
    assert store.upsert_records(records=[_record()]) == 0
    assert store.upsert_records(records=[_record(value=2.0)]) == 1
    recs = store.records()
    assert [r.patient_id for r in recs] == ["P-" + "a" * 32, "P-" + "b" * 32]
    assert recs[0].events[0].value == 2.0
    assert store.counts() == {"patients": 2, "events": 2, "quarantined": 0}


def test_records_are_encrypted_at_rest(store, db_url):
    store.upsert_records(records=[_record()])
    with sa.create_engine(db_url).connect() as c:
        rows = c.execute(sa.text("SELECT ciphertext, content_mac FROM patient")).all()
    blob = bytes(rows[0][0])
    assert b"13457-7" not in blob and b"baseline" not in blob and len(rows[0][1]) == 64


def test_tampered_or_moved_ciphertext_is_detected(store, db_url):
    store.upsert_records(records=[_record(), _record("P-" + "b" * 32)])
    eng = sa.create_engine(db_url)
    with eng.begin() as c:  # swap the two ciphertexts between rows
        a, b = (bytes(x[0]) for x in c.execute(sa.text("SELECT ciphertext FROM patient ORDER BY pseudonym")).all())
        c.execute(sa.text("UPDATE patient SET ciphertext = :c WHERE pseudonym = :p"), {"c": b, "p": "P-" + "a" * 32})
    eng.dispose()
    with pytest.raises(TamperedError):
        store.records()


def test_failed_batch_leaves_store_unchanged(store):
    store.upsert_records(records=[_record()])

    def bad_batch():
        yield _record("P-" + "c" * 32)
        raise ValueError("boom")

    with pytest.raises(ValueError):
        store.upsert_records(records=bad_batch())
    assert store.counts()["patients"] == 1


def test_rotate_key_rewraps_without_reencrypting(small_cohort, site_dir):
    _, out = small_cohort
    ingest_extract(site_dir=site_dir, patients_csv=out / "site-1" / "patients.csv", events_csv=out / "site-1" / "events.csv")
    settings = get_settings(site_dir)
    eng = sa.create_engine(settings.db_url)
    with eng.connect() as c:
        before = c.execute(sa.text("SELECT pseudonym, ciphertext FROM patient ORDER BY pseudonym")).all()
    old_key = load_keyring(site_dir).active_key
    result = rotate_master_key(site_dir=site_dir)
    ring = load_keyring(site_dir)
    assert result["active"] == ring.active == "k2" and list(ring.keys) == ["k2"] and ring.active_key != old_key
    with eng.connect() as c:
        after = c.execute(sa.text("SELECT pseudonym, ciphertext FROM patient ORDER BY pseudonym")).all()
        masters = {r[0] for r in c.execute(sa.text("SELECT master_id FROM data_key")).all()}
    assert before == after and masters == {"k2"}  # data untouched, keys re-wrapped
    assert len(open_store(settings).records()) == len(before)


def test_migrations_create_exactly_the_orm_schema(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlmodel import SQLModel

    from evoclone.site_node.migrate import current, upgrade

    engine = sa.create_engine(db_url)
    assert current(engine) is None
    upgrade(engine)
    upgrade(engine)  # idempotent
    assert current(engine) == "0004"  # the newest revision
    # the coordinator's tables share SQLModel's metadata when both services are imported in one process
    coordinator = {m.local_table.name for m in SQLModel._sa_registry.mappers
                   if m.class_.__module__.startswith("evoclone.coordinator")}
    site = sa.MetaData()
    for table in SQLModel.metadata.sorted_tables:
        if table.name not in coordinator:
            table.to_metadata(site)
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), site)
    assert [d for d in diff if "event_log" not in str(d)] == []
    engine.dispose()


def test_processes_opening_a_new_site_database_together_migrate_it_once(db_url):
    """The SuperNode, a ClientApp and the API may open a new site database at once: one migrates, in one
    transaction, the others wait and find it current."""
    from evoclone.site_node.migrate import current, upgrade

    with upgraded_at_once(db_url, upgrade) as (engines, _, errors):
        assert errors == [] and {current(e) for e in engines} == {"0004"}
        with engines[0].connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1


def test_ahead_keeps_order_hands_over_the_producers_error_and_stops_with_the_caller():
    """The store seals records ahead in a thread while it waits on a database server: same items in the same
    order, the producer's exception raised in the caller, and no producer left running when the caller stops."""
    import threading

    from evoclone.site_node.store import ahead

    assert list(ahead(iter(range(100)), depth=2)) == list(range(100))

    def failing():
        yield 1
        raise ValueError("bad record")

    got = []
    with pytest.raises(ValueError, match="bad record"):
        for x in ahead(failing()):
            got.append(x)
    assert got == [1]
    produced = []

    def endless():
        while True:
            produced.append(1)
            yield len(produced)

    for x in ahead(endless(), depth=2):
        if x == 3:
            break
    assert not any(t.name == "evoclone-ahead" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1  # at most `depth` (and the one being put) beyond what the caller took
