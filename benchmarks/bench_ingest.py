"""Benchmark site ingest (validate + anonymize + encrypt + store) on SQLite and PostgreSQL.

Each measurement runs in its own process (so peak memory is its own) on a fresh store,
and is compared with a naive baseline in the same run: the same records inserted one
ORM row per statement, committed one by one, on the same PostgreSQL server.

    .venv/bin/python benchmarks/bench_ingest.py [--patients 10000,50000,100000] [--naive-patients 500]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


def _fresh_pg() -> str:
    import sqlalchemy as sa

    name = f"evoclone_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name


def _drop_pg(name: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _tree_pss_mb(pid: int) -> float:
    """The proportional set size of `pid` and its descendants: each page shared between them counted once."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total / 1024


class PeakMemory:
    """The peak PSS of this process and its worker processes, sampled every 100 ms in a thread (the ingest's
    validation forks one worker per core; a worker's own peak counts pages it shares with this process)."""

    def __init__(self) -> None:
        import os
        import threading

        self.peak, self._stop = _tree_pss_mb(os.getpid()), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(os.getpid(),), daemon=True)
        self._thread.start()

    def _run(self, pid: int) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, _tree_pss_mb(pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def worker(mode: str, extract: Path, db: str, limit: int) -> None:
    """Run one measurement in this process and print its JSON result."""
    import os

    from evoclone.site_node.settings import init_site

    work = Path(tempfile.mkdtemp(prefix="evoclone-bench-"))
    if db:
        os.environ["EVOCLONE_DATABASE_URL"] = f"{PG}/{db}"
    site = work / "site"
    init_site(site, name="bench")
    memory = PeakMemory()
    t0 = time.perf_counter()
    if mode == "pipeline":
        from evoclone.site_node.pipeline import ingest_extract

        counts = ingest_extract(site_dir=site, patients_csv=extract / "patients.csv", events_csv=extract / "events.csv")
        events = counts["events"]
    else:  # naive: same parse and anonymization, then one ORM row per statement and commit
        from sqlmodel import Session

        from evoclone.privacy.envelope import new_key, seal, wrap
        from evoclone.privacy.pseudonym import Pseudonymizer
        from evoclone.site_node.ingest import read_extract
        from evoclone.site_node.pipeline import open_store
        from evoclone.site_node.settings import get_settings, load_key
        from evoclone.site_node.store import DataKeyRow, PatientRow

        settings = get_settings(site)
        records, _ = read_extract(extract / "patients.csv", extract / "events.csv", site="bench",
                                  pseudonymizer=Pseudonymizer(key=load_key(settings)))
        import itertools

        with records:
            records = list(itertools.islice(records, limit))
        t0 = time.perf_counter()  # time the inserts only: the baseline's parse is the pipeline's
        store = open_store(settings)
        events = 0
        for r in records:
            with Session(store.engine) as session:
                key = new_key()
                w = wrap(key, master_key=store.keyring.active_key, master_id=store.keyring.active)
                k = DataKeyRow(master_id=w.master_id, nonce=w.nonce, wrapped=w.ciphertext)
                session.add(k)
                session.commit()
                payload = r.model_dump_json().encode()
                session.add(PatientRow(pseudonym=r.patient_id, site=r.site, n_events=len(r.events),
                                       content_mac=store._mac(payload), data_key_id=k.id,
                                       ciphertext=seal(payload, data_key=key, context=r.patient_id.encode())))
                session.commit()
            events += len(r.events)
    seconds = time.perf_counter() - t0
    peak_mb = memory.stop()
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"mode": mode, "events": events, "seconds": seconds, "peak_mb": peak_mb}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", default="10000")
    ap.add_argument("--naive-patients", type=int, default=500)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        mode, extract, db, limit = args.worker
        worker(mode, Path(extract), db if db != "-" else "", int(limit))
        return 0

    from rich.console import Console
    from rich.table import Table

    from evoclone.federated.simulator import simulate_cohort, write_cohort

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="evoclone-bench-data-"))
    try:
        for n in [int(x) for x in args.patients.split(",")]:
            write_cohort(simulate_cohort(patients=n, sites=1, seed=n), tmp / str(n))
            extract = tmp / str(n) / "site-1"
            runs = [("pipeline", "sqlite", "-", n), ("pipeline", "postgresql", "pg", n)]
            if n == min(int(x) for x in args.patients.split(",")):
                runs.append(("naive", "postgresql", "pg", args.naive_patients))
            for mode, backend, db, limit in runs:
                name = _fresh_pg() if db == "pg" else "-"
                try:
                    out = subprocess.run([sys.executable, __file__, "--worker", mode, str(extract), name, str(limit)],
                                         capture_output=True, text=True, check=True)
                finally:
                    if name != "-":
                        _drop_pg(name)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"patients": n if mode == "pipeline" else limit, "backend": backend, **r,
                             "events_per_s": r["events"] / r["seconds"]})
                print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    naive = next((r["events_per_s"] for r in rows if r["mode"] == "naive"), None)
    t = Table(title=f"site ingest on {platform.node()}, {date.today()} (validate + anonymize + encrypt + store)")
    for col in ("patients", "events", "backend", "mode", "seconds", "events/s", "x naive", "peak MB"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["patients"]), str(r["events"]), r["backend"], r["mode"], f"{r['seconds']:.1f}",
                  f"{r['events_per_s']:,.0f}", f"{r['events_per_s'] / naive:.1f}" if naive else "-", f"{r['peak_mb']:.0f}")
    Console().print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
