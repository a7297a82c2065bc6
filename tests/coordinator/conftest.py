"""Coordinator fixtures: an initialised state directory, the app on SQLite or PostgreSQL, users and tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch):
    """Fast argon2 parameters: the tests check behaviour, not the cost (production keeps the library default)."""
    from argon2 import PasswordHasher

    monkeypatch.setattr("evoclone.privacy.passwords._hasher",
                        lambda: PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@pytest.fixture
def state_dir(tmp_path):
    """A fresh coordinator state directory (SQLite database inside it)."""
    from evoclone.coordinator.state import init_state

    d = tmp_path / "coord"
    init_state(d)
    return d


@pytest.fixture
def settings(state_dir):
    """Settings of the SQLite state directory."""
    from evoclone.coordinator.settings import load_settings

    return load_settings(state_dir)


@pytest.fixture
def pg_settings(state_dir, db_url):
    """Settings of the state directory on SQLite, then on a throwaway PostgreSQL database."""
    from evoclone.coordinator.settings import load_settings

    return load_settings(state_dir).model_copy(update={"database_url": db_url})


def _client(settings) -> Iterator[TestClient]:
    from evoclone.coordinator.api.main import create_app

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    """A test client of the app on SQLite (tables created)."""
    yield from _client(settings)


@pytest.fixture
def pg_client(pg_settings) -> Iterator[TestClient]:
    """A test client of the app on SQLite, then PostgreSQL."""
    yield from _client(pg_settings)


def add_user(client: TestClient, username: str, role: str, password: str = PASSWORD) -> None:
    """Create a user straight in the app's database."""
    from evoclone.coordinator.models import UserCreate
    from evoclone.coordinator.users import create_user

    with Session(client.app.state.engine) as session:
        create_user(session=session, data=UserCreate(username=username, role=role, password=password))
        session.commit()


def login(client: TestClient, username: str, password: str = PASSWORD) -> dict:
    """Log in and return the token pair."""
    r = client.post("/api/v1/auth/token", data={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def headers_for() -> Callable[[TestClient, str], dict[str, str]]:
    """`headers_for(client, role)`: Authorization headers of a new user with that role."""
    made: dict[tuple[int, str], dict[str, str]] = {}

    def make(client: TestClient, role: str) -> dict[str, str]:
        key = (id(client), role)
        if key not in made:
            add_user(client, f"{role}-user", role)
            made[key] = {"Authorization": f"Bearer {login(client, f'{role}-user')['access_token']}"}
        return made[key]

    return make


def enrol_payload(name: str) -> dict:
    """A valid enrolment request for `name` (CSR and SuperNode key)."""
    from evoclone.privacy.enrolment import new_csr
    from evoclone.privacy.pki import new_node_keypair

    _, csr = new_csr(name)
    _, pub = new_node_keypair(name)
    return {"name": name, "csr_pem": csr.decode(), "supernode_public_key": pub.decode()}


def active_site(client: TestClient, admin: dict[str, str], name: str) -> int:
    """Enrol and accept a site; its id."""
    r = client.post("/api/v1/sites/enrol", json=enrol_payload(name))
    assert r.status_code == 202, r.text
    site_id = r.json()["id"]
    r = client.post(f"/api/v1/sites/{site_id}/accept", headers=admin)
    assert r.status_code == 200, r.text
    return site_id
