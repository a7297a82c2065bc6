"""A SIGKILL in the middle of an ingest leaves the store as it was before the batch."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from evoclone.federated.simulator import simulate_cohort, write_cohort
from evoclone.site_node.pipeline import ingest_extract, open_store
from evoclone.site_node.settings import get_settings

pytestmark = pytest.mark.slow


def test_sigkill_mid_batch_rolls_back(site_dir, tmp_path):
    small = simulate_cohort(patients=40, sites=1, seed=3)
    write_cohort(small, tmp_path / "small")
    ingest_extract(site_dir=site_dir, patients_csv=tmp_path / "small" / "site-1" / "patients.csv",
                   events_csv=tmp_path / "small" / "site-1" / "events.csv")
    before_counts = open_store(get_settings(site_dir)).counts()
    before_db = hashlib.sha256((site_dir / "site.db").read_bytes()).hexdigest()

    big = simulate_cohort(patients=3000, sites=1, seed=4)
    write_cohort(big, tmp_path / "big")
    code = ("from pathlib import Path; from evoclone.site_node.pipeline import ingest_extract; "
            f"ingest_extract(site_dir=Path({str(site_dir)!r}), patients_csv=Path({str(tmp_path / 'big/site-1/patients.csv')!r}), "
            f"events_csv=Path({str(tmp_path / 'big/site-1/events.csv')!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code])
    journal = site_dir / "site.db-journal"
    deadline = time.monotonic() + 300
    while not journal.exists():  # the write transaction has begun
        assert proc.poll() is None, "ingest finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    get_settings.cache_clear()
    assert open_store(get_settings(site_dir)).counts() == before_counts  # SQLite rolls back the hot journal
    assert hashlib.sha256((site_dir / "site.db").read_bytes()).hexdigest() == before_db
