"""Registry and status reads answered from the per-process response cache: kept while the database is unchanged,
recomputed after a write committed by any coordinator process, bounded in time for writes made around it, and
still authenticated, authorised and audited on every request."""

from __future__ import annotations

import subprocess
import sys
import time

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from evoclone.coordinator.models import AuditEvent

from .conftest import enrol_payload, login

def _settings(pg_settings, **update):
    return pg_settings.model_copy(update=update)  # SQLite, then PostgreSQL


def _name(client: TestClient, headers: dict, site_id: int) -> str:
    r = client.get(f"/api/v1/sites/{site_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["name"]


def _rename_behind_the_coordinators_back(url: str, site_id: int, name: str) -> None:
    """SQL typed into the database by hand: no coordinator engine, so no data version change."""
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE site SET name = :n WHERE id = :i"), {"n": name, "i": site_id})
    engine.dispose()


RENAME_IN_ANOTHER_PROCESS = r'''
import sys
from sqlmodel import Session
from evoclone.coordinator.db import make_engine
from evoclone.coordinator.models import Site
from evoclone.coordinator.settings import load_settings
from pathlib import Path
settings = load_settings(Path(sys.argv[1])).model_copy(update={"database_url": sys.argv[2]})
engine = make_engine(settings)
with Session(engine) as s:
    site = s.get(Site, int(sys.argv[3]))
    site.name = sys.argv[4]
    s.add(site)
    s.commit()
'''


def test_a_kept_answer_lasts_until_any_coordinator_process_writes(pg_settings, headers_for):
    from evoclone.coordinator.api.main import create_app

    s = _settings(pg_settings, response_cache_seconds=60)
    with TestClient(create_app(s)) as client:
        admin = headers_for(client, "admin")
        site_id = client.post("/api/v1/sites/enrol", json=enrol_payload("north")).json()["id"]
        assert _name(client, admin, site_id) == "north"
        assert _name(client, admin, site_id) == "north"  # kept from here on
        _rename_behind_the_coordinators_back(s.db_url, site_id, "by-hand")
        assert _name(client, admin, site_id) == "north"  # the kept answer: nothing told this process
        # a write through the API (another site enrols) makes every kept answer stale
        assert client.post("/api/v1/sites/enrol", json=enrol_payload("south")).status_code == 202
        assert _name(client, admin, site_id) == "by-hand"
        # a write committed by another coordinator process (a CLI command, the run dispatcher)
        r = subprocess.run([sys.executable, "-c", RENAME_IN_ANOTHER_PROCESS, str(s.state_dir), s.db_url,
                            str(site_id), "from-cli"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert _name(client, admin, site_id) == "from-cli"
        # lists are kept too, per query string
        assert [x["name"] for x in client.get("/api/v1/sites", headers=admin).json()] == ["from-cli", "south"]
        assert client.get("/api/v1/sites?status=active", headers=admin).json() == []


def test_a_write_made_around_the_coordinator_shows_within_the_time_limit(pg_settings, headers_for):
    from evoclone.coordinator.api.main import create_app

    s = _settings(pg_settings, response_cache_seconds=0.3)
    with TestClient(create_app(s)) as client:
        admin = headers_for(client, "admin")
        site_id = client.post("/api/v1/sites/enrol", json=enrol_payload("north")).json()["id"]
        assert _name(client, admin, site_id) == _name(client, admin, site_id) == "north"
        _rename_behind_the_coordinators_back(s.db_url, site_id, "by-hand")
        time.sleep(0.4)  # the documented bound: response_cache_seconds
        assert _name(client, admin, site_id) == "by-hand"
    with TestClient(create_app(_settings(pg_settings, response_cache_seconds=0))) as client:
        admin = {"Authorization": f"Bearer {login(client, 'admin-user')['access_token']}"}
        assert _name(client, admin, site_id) == _name(client, admin, site_id) == "by-hand"
        _rename_behind_the_coordinators_back(s.db_url, site_id, "again")
        assert _name(client, admin, site_id) == "again"  # no cache at all


def test_kept_answers_still_need_a_valid_token_and_are_audited(pg_settings, headers_for):
    from evoclone.coordinator.api.main import create_app

    s = _settings(pg_settings, response_cache_seconds=60)
    with TestClient(create_app(s)) as client:
        admin, auditor = headers_for(client, "admin"), headers_for(client, "auditor")
        for _ in range(2):
            assert client.get("/api/v1/sites", headers=admin).status_code == 200
        with Session(client.app.state.engine) as session:
            before = len(session.exec(select(AuditEvent).where(AuditEvent.resource == "/api/v1/sites")).all())
        for _ in range(3):
            assert client.get("/api/v1/sites", headers=admin).json() == []
        assert client.get("/api/v1/sites", headers=auditor).status_code == 200  # its own role's answer
        forged = {"Authorization": admin["Authorization"][:-4] + "AAAA"}
        r = client.get("/api/v1/sites", headers=forged)
        assert r.status_code == 401 and "invalid" in r.json()["detail"]
        assert client.get("/api/v1/sites").status_code == 401
        with Session(client.app.state.engine) as session:
            events = session.exec(select(AuditEvent).where(AuditEvent.resource == "/api/v1/sites")
                                  .order_by(AuditEvent.seq)).all()[before:]
        assert [(e.actor, e.outcome) for e in events] == [("admin-user", "ok")] * 3 + [("auditor-user", "ok")] + \
            [("", "denied"), ("", "denied")]
        assert all(e.action == "http.get" for e in events)
