"""The per-request path under load: group-committed audit events (durable before the response, one chain),
the user check cached for a bounded time (a disabled user is refused within it), and a request the trail
cannot hold is never served."""

from __future__ import annotations

import asyncio
import time

import httpx
from sqlmodel import Session, select

from evoclone.coordinator.audit import verify_stored_chain
from evoclone.coordinator.models import AuditEvent, User


def _http_events(engine) -> list[AuditEvent]:
    with Session(engine) as session:
        return [e for e in session.exec(select(AuditEvent).order_by(AuditEvent.seq)).all()
                if e.action.startswith("http.")]


def test_concurrent_requests_are_group_committed_into_one_valid_chain(pg_client, headers_for):
    client = pg_client
    admin = headers_for(client, "admin")
    app, writer = client.app, client.app.state.audit
    before, batches = len(_http_events(app.state.engine)), writer.batches

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://coord") as c:
            return await asyncio.gather(*(c.get("/api/v1/studies" if i % 2 else "/health", headers=admin)
                                          for i in range(60)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 60
    events = _http_events(app.state.engine)[before:]
    # every response had its event committed before it started: all 60 are there, each under its request id
    assert sorted(e.request_id for e in events) == sorted(r.headers["x-request-id"] for r in responses)
    assert writer.batches - batches < 60  # several requests shared a commit
    with Session(app.state.engine) as session:
        report = verify_stored_chain(session=session)
    assert report.ok, report.problem


def test_a_disabled_user_is_refused_within_the_cache_window(settings, headers_for):
    from fastapi.testclient import TestClient

    from evoclone.coordinator.api.main import create_app

    with TestClient(create_app(settings.model_copy(update={"user_cache_seconds": 0.3}))) as client:
        sponsor = headers_for(client, "sponsor")
        assert client.get("/api/v1/studies", headers=sponsor).status_code == 200
        with Session(client.app.state.engine) as session:
            user = session.exec(select(User).where(User.username == "sponsor-user")).one()
            user.disabled = True
            session.add(user)
            session.commit()
        time.sleep(0.4)  # the documented bound: user_cache_seconds
        r = client.get("/api/v1/studies", headers=sponsor)
        assert r.status_code == 401 and "disabled" in r.json()["detail"]

    with TestClient(create_app(settings.model_copy(update={"user_cache_seconds": 0}))) as client:
        admin = headers_for(client, "admin")
        assert client.get("/api/v1/studies", headers=admin).status_code == 200
        with Session(client.app.state.engine) as session:
            user = session.exec(select(User).where(User.username == "admin-user")).one()
            user.role = "auditor"
            session.add(user)
            session.commit()
        r = client.get("/api/v1/studies", headers=admin)  # no cache: at once
        assert r.status_code == 401 and "changed role" in r.json()["detail"]


def test_a_request_whose_audit_event_cannot_be_committed_is_not_served(client, headers_for):
    admin = headers_for(client, "admin")

    def broken(_write) -> None:
        raise RuntimeError("disk full")

    client.app.state.audit.retry = broken
    r = client.get("/api/v1/studies", headers=admin)
    assert r.status_code == 503 and r.json()["detail"].startswith("the database is not reachable; retry")
    assert "could not be audited" in r.json()["detail"] and r.headers["x-request-id"]
    assert client.get("/health").status_code == 503


def test_a_served_app_freezes_what_startup_made_out_of_the_collectors_passes(state_dir):
    import subprocess
    import sys

    # a fresh interpreter: freezing is for a process that serves one app, not for this test process
    probe = ("import gc, sys\n"
             "from fastapi.testclient import TestClient\n"
             "from evoclone.coordinator.api.main import create_app\n"
             "from pathlib import Path\nfrom evoclone.coordinator.settings import load_settings\n"
             "with TestClient(create_app(load_settings(Path(sys.argv[1])), serving=sys.argv[2] == 'yes')) as c:\n"
             "    assert c.get('/health').status_code == 200\n"
             "    print(gc.get_freeze_count())\n")
    counts = {serving: int(subprocess.run([sys.executable, "-c", probe, str(state_dir), serving], check=True,
                                          capture_output=True, text=True).stdout.split()[-1])
              for serving in ("yes", "no")}
    assert counts["no"] == 0 and counts["yes"] > 50_000  # modules, routes and schemas: several 100k objects
