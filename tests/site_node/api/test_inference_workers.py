"""Model inference in worker processes: cached lookups are served while the only worker is busy, workers pick up a
newly promoted version, a model that fails to load in a worker gives the same clear error, a killed worker costs
one 503 and nothing more; and the access log's group commit."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlmodel import Session

from evoclone.site_node.inference import _worker_model

from .conftest import make_client
from .twin_model import coordinator_key, model_dir, public_pem, signed_bundle  # noqa: F401 (fixtures)

R = {"reason": "treatment"}


def hold(_site_dir: str, gate: str, pid_file: str = "") -> int:
    """(In a worker) write this process's id to `pid_file`, wait until the file `gate` exists; the id."""
    if pid_file:
        Path(pid_file).write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def worker_pid(_site_dir: str) -> int:
    """(In a worker) its process id."""
    return os.getpid()


def _wait(check, what: str, timeout: float = 60) -> None:
    deadline, delay = time.monotonic() + timeout, 0.01
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def _twins(client, headers, patient, **body):
    return client.post(f"/api/v1/patients/{patient}/twins", params=R, headers=headers,
                       json={"arm": "treatment", "count": 2, **body})


@pytest.fixture
def one_worker(settings, clock, patient, headers_for, model_dir, coordinator_key):  # noqa: F811
    """(client, clinician headers) of an app with a single inference worker and model v1 installed."""
    from evoclone.site_node.local_models import install_bundle

    for client in make_client(settings.model_copy(update={"inference_workers": 1}), clock):
        install_bundle(engine=client.app.state.engine, site_dir=settings.site_dir,
                       bundle=signed_bundle(model_dir, coordinator_key, version="v1"),
                       public_key_pem=public_pem(coordinator_key))
        yield client, headers_for(client, "clinician")


def test_cached_lookups_are_served_while_the_only_worker_is_busy(one_worker, patient, tmp_path):
    client, clinician = one_worker
    first = _twins(client, clinician, patient)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss", first.text
    services = client.app.state.twins
    assert services.inference.workers == 1
    gate = tmp_path / "gate"
    busy = services.inference.submit(hold, str(gate))  # the only worker is taken, as by a long generation
    with ThreadPoolExecutor(1) as ex:
        slow = ex.submit(_twins, client, clinician, patient, seed=7)  # uncached: it waits for that worker
        _wait(lambda: services.inference.pending >= 2, "the generation to queue behind the held worker")
        for _ in range(5):
            r = _twins(client, clinician, patient)
            assert r.status_code == 200 and r.headers["x-cache"] == "hit" and r.json() == first.json()
            assert float(r.headers["server-timing"].removeprefix("app;dur=")) >= 0
            assert client.get("/health").status_code == 200
        assert not slow.done()  # cached answers came while the generation was still waiting for the worker
        gate.touch()
        r = slow.result(timeout=120)
    assert r.status_code == 200 and r.headers["x-cache"] == "miss" and r.json()["model_version"] == "v1"
    assert busy.result() != os.getpid()
    assert _worker_model.cache_info().currsize == 0  # no model was ever loaded in this (the API's) process


def test_workers_pick_up_a_newly_promoted_version(one_worker, patient, model_dir, coordinator_key):  # noqa: F811
    from evoclone.site_node.local_models import install_bundle, promote_version

    client, clinician = one_worker
    engine = client.app.state.engine
    assert _twins(client, clinician, patient).json()["model_version"] == "v1"
    services = client.app.state.twins
    pid = services.inference.call(worker_pid)
    # installed and promoted by another process (the CLI): this app is not told; the next task names v2
    install_bundle(engine=engine, site_dir=client.app.state.settings.site_dir,
                   bundle=signed_bundle(model_dir, coordinator_key, version="v2"))
    r = _twins(client, clinician, patient)
    assert r.headers["x-cache"] == "miss" and r.json()["model_version"] == "v2"
    p = client.get(f"/api/v1/patients/{patient}/prediction", params={**R, "arm": "control"}, headers=clinician)
    assert p.status_code == 200 and p.json()["model_version"] == "v2"
    promote_version(engine=engine, version="v1")  # a rollback
    r = _twins(client, clinician, patient, seed=3)
    assert r.headers["x-cache"] == "miss" and r.json()["model_version"] == "v1"
    assert services.inference.call(worker_pid) == pid  # the same worker reloaded; it was not restarted
    assert _worker_model.cache_info().currsize == 0


def test_a_model_that_fails_to_load_in_a_worker_gives_the_clear_error_and_the_worker_survives(one_worker, patient):
    from evoclone.site_node.local_models import models_root

    client, clinician = one_worker
    weights = models_root(client.app.state.settings.site_dir) / "v1" / "generator.safetensors"
    good = weights.read_bytes()
    data = bytearray(good)
    data[-3] ^= 0x01  # one flipped bit on disk after installation, before the first load
    weights.write_bytes(bytes(data))
    for r in (_twins(client, clinician, patient),
              client.get(f"/api/v1/patients/{patient}/prediction", params={**R, "arm": "control"}, headers=clinician),
              client.post("/api/v1/jobs/cohort-predictions", params=R, headers=clinician, json={"arm": "control"})):
        assert r.status_code == 503, r.text
        detail = r.json()["detail"]
        assert detail.startswith("model failed to load: version v1:") and "\n" not in detail and patient not in detail
    pid = client.app.state.twins.inference.call(worker_pid)
    weights.write_bytes(good)  # repaired: a failed load is not remembered, the next task verifies again
    r = _twins(client, clinician, patient)
    assert r.status_code == 200 and r.json()["model_version"] == "v1"
    assert client.app.state.twins.inference.call(worker_pid) == pid


def test_a_killed_worker_costs_its_requests_a_503_and_the_next_request_gets_a_new_worker(one_worker, patient,
                                                                                        tmp_path, caplog):
    client, clinician = one_worker
    assert _twins(client, clinician, patient).status_code == 200
    services = client.app.state.twins
    gate, pid_file = tmp_path / "gate", tmp_path / "pid"
    busy = services.inference.submit(hold, str(gate), str(pid_file))
    _wait(pid_file.exists, "the worker to start the held task")
    with ThreadPoolExecutor(1) as ex:
        queued = ex.submit(_twins, client, clinician, patient, seed=11)
        _wait(lambda: services.inference.pending >= 2, "the generation to queue")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the kernel's OOM killer, or an operator
        r = queued.result(timeout=120)
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["detail"].startswith("the inference worker ended unexpectedly") and patient not in r.text
    with pytest.raises(Exception):
        busy.result()
    r = _twins(client, clinician, patient, seed=11)
    assert r.status_code == 200 and r.headers["x-cache"] == "miss"
    assert services.inference.call(worker_pid) != int(pid_file.read_text())
    assert "inference worker process ended unexpectedly" in caplog.text


def test_access_log_group_commit_answers_after_commit_and_isolates_a_bad_entry(settings, caplog):
    import sqlalchemy as sa

    from evoclone.federated.stores.engine import make_engine
    from evoclone.site_node.access_log import AccessEntry, AccessEntryCreate, AccessLogWriter, verify_log
    from evoclone.site_node.migrate import upgrade

    engine = make_engine(settings.db_url)
    upgrade(engine)
    writer = AccessLogWriter(engine=engine)
    good = AccessEntryCreate(actor="dr-ng", role="clinician", action="twin.read", pseudonym="P-" + "a" * 32,
                             reason="treatment")
    bad = AccessEntryCreate.model_construct(actor=None, role="clinician", action="twin.read", pseudonym="",
                                            reason="treatment", outcome="ok", request_id="")  # NOT NULL violated
    seen: list[int] = []

    def committed(fut) -> None:  # runs when a request would answer: its entry must already be readable
        if fut.exception() is None:
            with Session(engine) as s:
                seen.append(s.get(AccessEntry, fut.result().seq) is not None)

    blocker = engine.raw_connection()  # hold SQLite's write lock: the entries queue up and go in batches
    blocker.cursor().execute("BEGIN IMMEDIATE")
    try:
        futs = [writer.submit(bad if i == 20 else good) for i in range(40)]
    finally:
        blocker.rollback()
        blocker.close()
    for fut in futs:
        fut.add_done_callback(committed)
    with pytest.raises(sa.exc.IntegrityError):
        futs[20].result(timeout=60)
    rows = [f.result(timeout=60) for i, f in enumerate(futs) if i != 20]
    assert sorted(r.seq for r in rows) == list(range(1, 40))
    _wait(lambda: len(seen) == 39, "every done-callback")  # callbacks run just after the result is set
    assert all(seen)
    assert verify_log(engine=engine).ok
    assert "appending one by one" in caplog.text
    writer.close()
    engine.dispose()


def test_routes_added_to_the_app_match_include_router(settings):
    from fastapi import FastAPI

    from evoclone.site_node.api.main import API_MODULES, API_PREFIX, add_routes, create_app
    from evoclone.site_node.api.routes import health, pages

    included = FastAPI(title=f"EvoClone site {settings.name}", version="1")
    included.include_router(health.router)
    for module in API_MODULES:
        included.include_router(module.router, prefix=API_PREFIX)
    included.include_router(pages.router)
    app = create_app(settings)
    assert app.openapi()["paths"] == included.openapi()["paths"]
    assert app.openapi()["components"] == included.openapi()["components"]
    with pytest.raises(TypeError, match="only API routes"):
        from fastapi import APIRouter
        from starlette.routing import Mount

        router = APIRouter()
        router.routes.append(Mount("/static", app=FastAPI()))
        add_routes(FastAPI(), router)


def test_inference_workers_setting(site_dir):
    from pydantic import ValidationError

    from evoclone.site_node.inference import InferencePool, default_workers
    from evoclone.site_node.settings import SiteSettings

    assert SiteSettings(site_dir=site_dir, name="s").inference_workers == 0  # automatic
    for bad in (-1, 65):
        with pytest.raises(ValidationError, match="inference_workers"):
            SiteSettings(site_dir=site_dir, name="s", inference_workers=bad)
    assert default_workers(1) >= 1 and default_workers(1000) == 1
    assert default_workers(1) == max(1, len(os.sched_getaffinity(0)) - 1)
    with pytest.raises(ValueError, match="at least one worker"):
        InferencePool(site_dir=site_dir, workers=0)


def test_the_api_answers_while_its_inference_workers_are_still_starting(settings, clock, monkeypatch):
    """`evoclone site serve` warms the workers (a forkserver importing torch: seconds) on a thread: the API answers
    while the warm-up is still running, and the shutdown lets the warm-up finish before it stops the workers."""
    import threading

    from fastapi.testclient import TestClient

    from evoclone.site_node.api.main import create_app
    from evoclone.site_node.inference import InferencePool

    release, calls = threading.Event(), []

    def slow_warm(self, ref):
        calls.append(("started", ref))
        release.wait(30)
        calls.append(("done", ref))

    monkeypatch.setattr(InferencePool, "warm", slow_warm)
    monkeypatch.setattr(InferencePool, "close", lambda self: calls.append(("closed", None)))
    app = create_app(settings, clock=clock, warm=True)
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok"}
        _wait(lambda: calls, "the warm-up to start")
        assert calls == [("started", None)]  # no model promoted yet: the workers start empty
        assert client.get("/ready").status_code == 200
        release.set()
    assert calls == [("started", None), ("done", None), ("closed", None)]  # the warm-up ended before the close
