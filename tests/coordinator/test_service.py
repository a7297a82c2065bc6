"""Service behaviour: metrics, body limits, malformed bodies, generic 500s, and the database going away."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from evoclone.coordinator.api.main import create_app

from .conftest import enrol_payload

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


def test_health_ready_and_metrics_by_route_template(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    for i in (1, 2, 3):
        client.get(f"/api/v1/sites/{i}")
    text = client.get("/metrics").text
    assert 'evoclone_coordinator_requests_total{method="GET",route="/api/v1/sites/{site_id}",status="401"} 3.0' in text
    assert 'evoclone_coordinator_request_seconds_bucket{le="0.005",method="GET",route="/health"}' in text
    assert "/api/v1/sites/1" not in text  # raw paths never become labels


def test_oversized_and_malformed_bodies(client, settings):
    limit = settings.max_body_bytes
    r = client.post("/api/v1/sites/enrol", content=b"{" + b" " * limit + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and f"{limit}-byte limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit holds while streaming too
        for _ in range(limit // 4096 + 2):
            yield b" " * 4096

    r = client.post("/api/v1/sites/enrol", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/api/v1/sites/enrol", content=b'{"name": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("the request body is not valid JSON")
    r = client.post("/api/v1/sites/enrol", json=[1, 2])
    assert r.status_code == 422 and "\n" not in r.json()["detail"]
    r = client.delete("/health")
    assert r.status_code == 405 and r.json()["detail"].startswith("method not allowed")


def test_unexpected_exception_is_a_generic_500_with_request_id(settings):
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom", headers={"x-request-id": "req-123"})
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error; give the operator request id req-123", "request_id": "req-123"}
    assert "Traceback" not in r.text and "passwd" not in r.text
    assert r.headers["x-request-id"] == "req-123"


@pytest.fixture
def pg_database():
    """A throwaway PostgreSQL database and an admin engine to kill its connections."""
    name = f"evoclone_coord_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def kill() -> int:
        with admin.connect() as c:
            return len(c.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                         "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": name}).all())

    yield f"{PG}/{name}", kill
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.mark.parametrize("pre_ping", [True, False])
def test_database_connections_dropped_are_retried(settings, headers_for, pg_database, pre_ping):
    url, kill = pg_database
    with TestClient(create_app(settings.model_copy(update={"database_url": url})),
                    raise_server_exceptions=False) as client:
        admin = headers_for(client, "admin")
        assert client.get("/api/v1/sites", headers=admin).status_code == 200
        # without pre-ping the pooled connection is used dead: the middleware replays the request
        client.app.state.engine.pool._pre_ping = pre_ping
        assert kill() >= 1
        r = client.post("/api/v1/sites/enrol", json=enrol_payload("site-a"))
        assert r.status_code == 202, r.text
        assert kill() >= 1
        r = client.get("/api/v1/sites", headers=admin)
        assert r.status_code == 200 and [s["name"] for s in r.json()] == ["site-a"]  # written exactly once
        retries = next(float(line.split()[1]) for line in client.get("/metrics").text.splitlines()
                       if line.startswith("evoclone_coordinator_db_retries_total "))
        assert (retries > 0) == (not pre_ping)
        assert client.get("/api/v1/audit/verify", headers=admin).json()["ok"] is True


def test_database_unreachable_is_503_not_a_traceback(settings):
    from evoclone.federated.flower.runtime import free_port

    down = settings.model_copy(update={"database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
                                       "db_retry_seconds": 0.3})
    client = TestClient(create_app(down), raise_server_exceptions=False)  # no lifespan: tables never created
    r = client.get("/ready")
    assert r.status_code == 503 and r.json() == {"detail": "not ready: the database is not reachable"}
    r = client.post("/api/v1/sites/enrol", json=enrol_payload("site-a"))
    assert r.status_code == 503 and r.json()["detail"].startswith("the database is not reachable; retry")
    assert "Traceback" not in r.text


def test_model_uploads_have_their_own_body_limit(settings):
    from fastapi.testclient import TestClient

    from evoclone.coordinator.api.main import create_app

    small = settings.model_copy(update={"max_body_bytes": 2048, "max_upload_bytes": 1 << 16})
    with TestClient(create_app(small), raise_server_exceptions=False) as client:
        big = b"x" * 4096
        r = client.post("/api/v1/studies", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "MAX_BODY_BYTES" in r.json()["detail"]
        # an upload of the same size passes the size check (and stops at authentication instead)
        r = client.post("/api/v1/studies/1/models", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 401
        r = client.post("/api/v1/studies/1/models", content=b"x" * (1 << 17), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "MAX_UPLOAD_BYTES" in r.json()["detail"]
