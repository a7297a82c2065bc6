"""Site review API under load (issue 8): cached twin lookups, uncached predictions and generations, 50 clients.

Builds a site (a simulated cohort ingested through the CSV pipeline), trains a tiny generator and
fusion ensemble, installs them as a coordinator-signed bundle, serves the site API with
`evoclone.site_node.service.serve` in a subprocess on loopback, and runs C concurrent clients
(asyncio + aiohttp, keep-alive, a clinician service-account token; `--client httpx` for the
earlier load generator, see benchmarks/loadgen.py) for D seconds. Each request is a
cached twin lookup (warmed first), an uncached prediction (a (patient, arm) never asked before) or
an uncached generation (a fresh seed). `/health` is the in-run baseline; the server columns are the
API's own time per request (its Server-Timing header), so the client's queueing shows as the
difference. Targets: zero errors, cached twin lookup p99 under 20 ms. One load-generator process
can itself be what limits the rate on a small machine: `--procs N` spreads the same clients and
mix over N processes. The clients start spread over the first second (`--ramp`, 0: all at the
same instant, a burst that a real clinic never sends); every request counts.

    python benchmarks/bench_site_api.py --clients 50 --seconds 60 [--ramp 0] [--procs 2] [--cached-only]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import CLIENTS, ERRORS, session  # noqa: E402
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
WARM = 40  # patients whose twins are cached before the run
SETTLE = 5.0  # seconds after which the clients are in the mix's steady state (reported on a line of its own)


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


async def _warm(base: str, token: str, pseudonyms: list[str], count: int, client: str) -> None:
    """Cache the twins of the first WARM patients: they are what the cached lookups read."""
    headers = {"Authorization": f"Bearer {token}", "X-Access-Reason": "research"}
    async with session(client, base, headers=headers) as send:
        for p in pseudonyms[:WARM]:
            r = await send("POST", f"/api/v1/patients/{p}/twins", json={"arm": "treatment", "count": count})
            if r.status != 200:
                raise RuntimeError(f"warming the cache: HTTP {r.status} {r.body[:200]!r}")


async def _run(base: str, token: str, pseudonyms: list[str], clients: int, seconds: float, count: int,
               cached_only: bool = False, part: int = 0, parts: int = 1, start_at: float = 0.0,
               ramp: float = 0.0, client_kind: str = "aiohttp") -> dict:
    """`clients` closed-loop clients (no think time) of load generator `part` of `parts` (each its own patients
    and seeds for the uncached requests, so no two ask the same thing)."""
    headers = {"Authorization": f"Bearer {token}", "X-Access-Reason": "research"}
    warm = pseudonyms[:WARM]
    fresh = itertools.cycle([(p, arm) for p in pseudonyms[WARM:][part::parts] for arm in ("control", "treatment")])
    used_predictions: set = set()
    seeds = itertools.count(1 + part, parts)
    lat: dict[str, list[float]] = {"cached twin lookup": [], "uncached prediction": [], "uncached generation": [],
                                   "/health (baseline)": []}
    errors: dict[str, int] = {k: 0 for k in lat}
    server: dict[str, list[float]] = {k: [] for k in lat}  # the API's own time (Server-Timing), where it says
    settled: list[float] = []  # cached lookups sent after the first SETTLE seconds (the steady state)
    sent: list[tuple] = []  # (kind, seconds since the start when sent, latency s): the run's timeline (--raw)
    why: collections.Counter = collections.Counter()
    cache_misses = {"cached twin lookup": 0}
    twins = [0]
    async with session(client_kind, base, headers=headers, connections=clients + 5) as send:
        await asyncio.sleep(max(0.0, start_at - time.time()))  # load-generator processes start together
        # then every client opens its keep-alive connection (unmeasured): the run measures requests, not TCP
        # setup; just before the start, since the server closes a connection idle for 5 s
        await asyncio.gather(*(send("GET", "/health") for _ in range(clients)))
        deadline = time.perf_counter() + seconds
        settle = deadline - seconds + SETTLE
        rng = random.Random(7 + part)

        async def client(i: int) -> None:
            await asyncio.sleep(ramp * (i * parts + part) / (clients * parts))  # the ramp: starts spread evenly
            while time.perf_counter() < deadline:
                x = rng.random()
                if cached_only:  # 95% cached lookups, 5% the baseline
                    x = 0.0 if x < 0.95 else 0.99
                if x < 0.75:
                    kind, req = "cached twin lookup", send(
                        "POST", f"/api/v1/patients/{rng.choice(warm)}/twins", json={"arm": "treatment", "count": count})
                elif x < 0.85:
                    p, arm = next(fresh)
                    kind = "uncached prediction" if (p, arm) not in used_predictions else "cached prediction"
                    used_predictions.add((p, arm))
                    lat.setdefault(kind, []), errors.setdefault(kind, 0), server.setdefault(kind, [])
                    req = send("GET", f"/api/v1/patients/{p}/prediction", params={"arm": arm})
                elif x < 0.95:
                    kind, req = "uncached generation", send(
                        "POST", f"/api/v1/patients/{rng.choice(pseudonyms)}/twins",
                        json={"arm": "control", "count": count, "seed": next(seeds)})
                else:
                    kind, req = "/health (baseline)", send("GET", "/health")
                t0 = time.perf_counter()
                try:
                    r = await req
                    ok = r.status == 200
                    if not ok:
                        why[f"{kind}: HTTP {r.status} {r.body[:120].decode(errors='replace')}"] += 1
                except ERRORS as exc:
                    ok, r = False, None
                    why[f"{kind}: {type(exc).__name__}"] += 1
                lat[kind].append(time.perf_counter() - t0)
                sent.append((kind, t0 - (deadline - seconds), lat[kind][-1]))
                if kind == "cached twin lookup" and t0 >= settle:
                    settled.append(lat[kind][-1])
                timing = r.headers.get("server-timing", "") if r is not None else ""
                if timing.startswith("app;dur="):
                    server[kind].append(float(timing[8:]) / 1000)
                if not ok:
                    errors[kind] += 1
                elif kind == "cached twin lookup" and r.headers.get("x-cache") != "hit":
                    cache_misses[kind] += 1
                elif kind == "uncached generation":
                    twins[0] += json.loads(r.body)["passed"]

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - start
    return {"lat": lat, "errors": errors, "wall": wall, "twins": twins[0], "misses": cache_misses, "why": why,
            "server": server, "settled": settled, "sent": sent}


def _part(args: tuple) -> dict:
    """One load-generator process: its share of the clients (run in a child process)."""
    return asyncio.run(_run(*args))


def _load(base: str, token: str, pseudonyms: list[str], clients: int, seconds: float, count: int,
          cached_only: bool, procs: int, ramp: float, client: str) -> dict:
    """Warm the cache, then run the clients in one process (the default) or spread over `procs` processes."""
    asyncio.run(_warm(base, token, pseudonyms, count, client))
    if procs <= 1:
        return asyncio.run(_run(base, token, pseudonyms, clients, seconds, count, cached_only, ramp=ramp,
                                client_kind=client))
    shares = [clients // procs + (i < clients % procs) for i in range(procs)]
    start_at = time.time() + 5  # time for every process to start and import
    jobs = [(base, token, pseudonyms, n, seconds, count, cached_only, i, procs, start_at, ramp, client)
            for i, n in enumerate(shares) if n]
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_part, jobs))
    merged = {"lat": {}, "errors": {}, "server": {}, "wall": max(r["wall"] for r in parts), "twins": sum(r["twins"] for r in parts),
              "misses": {"cached twin lookup": sum(r["misses"]["cached twin lookup"] for r in parts)},
              "why": sum((r["why"] for r in parts), collections.Counter()),
              "settled": [x for r in parts for x in r["settled"]], "sent": [x for r in parts for x in r["sent"]]}
    for r in parts:
        for kind, values in r["lat"].items():
            merged["lat"].setdefault(kind, []).extend(values)
            merged["server"].setdefault(kind, []).extend(r["server"][kind])
            merged["errors"][kind] = merged["errors"].get(kind, 0) + r["errors"][kind]
    return merged


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
    ap.add_argument("--ramp", type=float, default=1.0,
                    help="seconds over which the clients start, evenly spread (0: all at the same instant)")
    ap.add_argument("--procs", type=int, default=1,
                    help="spread the clients over this many load-generator processes (same mix, no think time)")
    ap.add_argument("--client", choices=CLIENTS, default="aiohttp",
                    help="the load generator's HTTP client (httpx costs about 20x more CPU per request)")
    ap.add_argument("--raw", type=Path, help="write every request (kind, seconds after the start, latency s) here "
                                             "as JSON, and print the cached lookups' p99 per second of the run")
    args = ap.parse_args()
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory() as tmp:
        console.print("building the site (ingest, train, install)...")
        site_dir, pseudonyms, token = _site(Path(tmp), args.patients)
        proc = _serve(site_dir, args.port, args.workers)
        try:
            res = _load(f"http://127.0.0.1:{args.port}", token, pseudonyms, args.clients, args.seconds, args.count,
                        args.cached_only, args.procs, args.ramp, args.client)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    table = Table(title=f"site API: {args.clients} {args.client} clients in {args.procs} process(es), "
                        f"started over {args.ramp:g} s, "
                        f"{res['wall']:.0f} s, loopback, {args.workers} worker(s)")
    for col in ("request", "n", "errors", "p50 ms", "p99 ms", "req/s", "server p50 ms", "server p99 ms"):
        table.add_column(col, justify="left" if col == "request" else "right")
    for kind, values in res["lat"].items():
        if not values:
            continue
        ms, own = np.array(values) * 1000, np.array(res["server"][kind]) * 1000
        table.add_row(kind, str(len(ms)), str(res["errors"][kind]), f"{np.percentile(ms, 50):.1f}",
                      f"{np.percentile(ms, 99):.1f}", f"{len(ms) / res['wall']:.1f}",
                      *((f"{np.percentile(own, 50):.1f}", f"{np.percentile(own, 99):.1f}") if len(own) else ("-", "-")))
    out = Console(width=150)  # the whole table on one line per row, also when written to a file
    out.print(table)
    total_errors = sum(res["errors"].values())
    out.print(f"generated twins per second (uncached, passed the gate): {res['twins'] / res['wall']:.1f}; "
              f"errors: {total_errors}; cached lookups that missed: {res['misses']['cached twin lookup']}")
    if res["settled"]:
        ms = np.array(res["settled"]) * 1000
        out.print(f"cached twin lookups sent after the first {SETTLE:g} s (steady state): n {len(ms)}, "
                  f"p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms")
    if args.raw:
        args.raw.write_text(json.dumps(res["sent"]))
        cached = [(t, x) for kind, t, x in res["sent"] if kind == "cached twin lookup"]
        for second in range(min(10, int(res["wall"]))):
            ms = np.array([x for t, x in cached if second <= t < second + 1]) * 1000
            if len(ms):
                out.print(f"  second {second}: {len(ms)} cached lookups sent, p50 {np.percentile(ms, 50):.1f} ms, "
                          f"p99 {np.percentile(ms, 99):.1f} ms")
    for what, n in res["why"].most_common(10):
        out.print(f"  {n} x {what}")
    sys.exit(1 if total_errors else 0)


if __name__ == "__main__":
    main()
