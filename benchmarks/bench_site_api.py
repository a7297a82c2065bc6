"""Site review API under load (issue 8): cached twin lookups, uncached predictions and generations, 50 clients.

Builds a site (a simulated cohort ingested through the CSV pipeline), trains a tiny generator and
fusion ensemble, installs them as a coordinator-signed bundle, serves the site API with
`evoclone.site_node.service.serve` in a subprocess on loopback, and runs C concurrent clients
(asyncio + httpx, keep-alive, a clinician service-account token) for D seconds. Each request is a
cached twin lookup (warmed first), an uncached prediction (a (patient, arm) never asked before) or
an uncached generation (a fresh seed). `/health` is the in-run baseline. Targets: zero errors,
cached twin lookup p99 under 20 ms.

    python benchmarks/bench_site_api.py --clients 50 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
WARM = 40  # patients whose twins are cached before the run


def _site(tmp: Path, patients: int) -> tuple[Path, list[str], str]:
    """An initialised site with a simulated extract ingested, the tiny model installed, and a clinician token."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from sqlmodel import Session, select

    from evoclone.federated.simulator import simulate_cohort, write_cohort
    from evoclone.federated.stores.engine import make_engine
    from evoclone.site_node.api_tokens import issue_token
    from evoclone.site_node.auth_models import ApiTokenCreate
    from evoclone.site_node.local_models import install_bundle
    from evoclone.site_node.migrate import upgrade
    from evoclone.site_node.pipeline import ingest_extract
    from evoclone.site_node.settings import get_settings, init_site
    from evoclone.site_node.store import PatientRow

    sys.path.insert(0, str(ROOT))
    from tests.site_node.api.twin_model import public_pem, signed_bundle, train_model_dir

    site_dir = tmp / "site"
    init_site(site_dir, name="bench-site")
    folder = next(iter(write_cohort(simulate_cohort(patients=patients, sites=1, seed=21), tmp / "cohort").values()))
    ingest_extract(site_dir=site_dir, patients_csv=folder / "patients.csv", events_csv=folder / "events.csv")
    key = Ed25519PrivateKey.generate()
    bundle = signed_bundle(train_model_dir(tmp / "model"), key, version="bench-v1")
    settings = get_settings(site_dir)
    engine = make_engine(settings.db_url)
    upgrade(engine)
    install_bundle(engine=engine, site_dir=site_dir, bundle=bundle, public_key_pem=public_pem(key))
    with Session(engine) as session:
        _, token = issue_token(session=session, data=ApiTokenCreate(name="bench", role="clinician"),
                               created_by="benchmark")
        session.commit()
        pseudonyms = list(session.exec(select(PatientRow.pseudonym).order_by(PatientRow.pseudonym)).all())
    engine.dispose()
    return site_dir, pseudonyms, token


def _serve(site_dir: Path, port: int, workers: int) -> subprocess.Popen:
    code = ("from pathlib import Path; from evoclone.site_node.service import serve; "
            "from evoclone.site_node.settings import get_settings; "
            f"serve(get_settings(Path({str(site_dir)!r})), host='127.0.0.1', port={port}, workers={workers}, "
            "log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError("the site API did not start within 30 s")


async def _run(base: str, token: str, pseudonyms: list[str], clients: int, seconds: float, count: int,
               cached_only: bool = False) -> dict:
    headers = {"Authorization": f"Bearer {token}", "X-Access-Reason": "research"}
    warm = pseudonyms[:WARM]
    fresh = itertools.cycle([(p, arm) for p in pseudonyms[WARM:] for arm in ("control", "treatment")])
    used_predictions: set = set()
    seeds = itertools.count(1)
    lat: dict[str, list[float]] = {"cached twin lookup": [], "uncached prediction": [], "uncached generation": [],
                                   "/health (baseline)": []}
    errors: dict[str, int] = {k: 0 for k in lat}
    cache_misses = {"cached twin lookup": 0}
    twins = [0]
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120,
                                 limits=httpx.Limits(max_connections=clients + 5)) as http:
        for p in warm:  # warm the cache: these twins are what the cached lookups read
            r = await http.post(f"/api/v1/patients/{p}/twins", json={"arm": "treatment", "count": count})
            r.raise_for_status()
        deadline = time.perf_counter() + seconds
        rng = random.Random(7)

        async def client() -> None:
            while time.perf_counter() < deadline:
                x = rng.random()
                if cached_only:  # 95% cached lookups, 5% the baseline
                    x = 0.0 if x < 0.95 else 0.99
                if x < 0.75:
                    kind, req = "cached twin lookup", http.post(
                        f"/api/v1/patients/{rng.choice(warm)}/twins", json={"arm": "treatment", "count": count})
                elif x < 0.85:
                    p, arm = next(fresh)
                    kind = "uncached prediction" if (p, arm) not in used_predictions else "cached prediction"
                    used_predictions.add((p, arm))
                    lat.setdefault(kind, []), errors.setdefault(kind, 0)
                    req = http.get(f"/api/v1/patients/{p}/prediction", params={"arm": arm})
                elif x < 0.95:
                    kind, req = "uncached generation", http.post(
                        f"/api/v1/patients/{rng.choice(pseudonyms)}/twins",
                        json={"arm": "control", "count": count, "seed": next(seeds)})
                else:
                    kind, req = "/health (baseline)", http.get("/health")
                t0 = time.perf_counter()
                try:
                    r = await req
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok, r = False, None
                lat[kind].append(time.perf_counter() - t0)
                if not ok:
                    errors[kind] += 1
                elif kind == "cached twin lookup" and r.headers.get("x-cache") != "hit":
                    cache_misses[kind] += 1
                elif kind == "uncached generation":
                    twins[0] += r.json()["passed"]

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"lat": lat, "errors": errors, "wall": wall, "twins": twins[0], "misses": cache_misses}


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--patients", type=int, default=1500)
    ap.add_argument("--count", type=int, default=5, help="twins per generation request")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--port", type=int, default=18471)
    ap.add_argument("--cached-only", action="store_true", help="only cached lookups (and the /health baseline)")
    args = ap.parse_args()
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory() as tmp:
        console.print("building the site (ingest, train, install)...")
        site_dir, pseudonyms, token = _site(Path(tmp), args.patients)
        proc = _serve(site_dir, args.port, args.workers)
        try:
            res = asyncio.run(_run(f"http://127.0.0.1:{args.port}", token, pseudonyms, args.clients, args.seconds,
                                   args.count, args.cached_only))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    table = Table(title=f"site API: {args.clients} clients, {res['wall']:.0f} s, loopback, {args.workers} worker(s)")
    for col in ("request", "n", "errors", "p50 ms", "p99 ms", "req/s"):
        table.add_column(col, justify="left" if col == "request" else "right")
    for kind, values in res["lat"].items():
        if not values:
            continue
        ms = np.array(values) * 1000
        table.add_row(kind, str(len(ms)), str(res["errors"][kind]), f"{np.percentile(ms, 50):.1f}",
                      f"{np.percentile(ms, 99):.1f}", f"{len(ms) / res['wall']:.1f}")
    Console().print(table)
    total_errors = sum(res["errors"].values())
    Console().print(f"generated twins per second (uncached, passed the gate): {res['twins'] / res['wall']:.1f}; "
                    f"errors: {total_errors}; cached lookups that missed: {res['misses']['cached twin lookup']}")
    sys.exit(1 if total_errors else 0)


if __name__ == "__main__":
    main()
