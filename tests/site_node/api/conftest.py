"""Site API fixtures: a site with a planted raw identifier ingested, the app over its stores with a movable
clock, users with TOTP, and authenticated headers per role.

Add routes in site_node/api/routes/ and use `client` + `headers_for(client, "clinician")` (or the
`clinician` fixture) to call them; move time with `clock.advance(seconds)`, never sleep.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyotp
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

PASSWORD = "correct horse battery staple"
REDIS = "redis://127.0.0.1:6379/0"
# raw identifiers planted in the ingested extract: none may ever appear in a response, log or store
MRN, NAME, PHONE = "MRN-PLANTED-774411", "Zebulon Quixotic", "617-555-7744"


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch):
    """Fast argon2 parameters: the tests check behaviour, not the cost (production keeps the library default)."""
    from argon2 import PasswordHasher

    monkeypatch.setattr("evoclone.privacy.passwords._hasher",
                        lambda: PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@dataclass
class Clock:
    """A service clock the tests move (the app reads it for expiry, lockouts, TOTP and rate windows)."""

    now: datetime = field(default_factory=lambda: datetime(2030, 1, 7, 9, 0, tzinfo=timezone.utc))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    """The app's clock, starting on a fixed date."""
    return Clock()


def write_extract(folder: Path, *, mrn: str = MRN) -> tuple[Path, Path]:
    """A two-patient CSV extract whose first patient carries the planted identifiers."""
    folder.mkdir(parents=True, exist_ok=True)
    patients = folder / "patients.csv"
    patients.write_text(
        "mrn,name,birth_date,sex,zip,phone,enrollment_date,arm,bmi,genotype,diabetes,hypertension,ckd,prior_mi,"
        "followup_end_date,event,response_wk24,ldl_wk24\n"
        f"{mrn},{NAME},1946-09-17,M,02135,{PHONE},2020-08-21,1,25.8,TC,0,0,0,0,2021-11-14,1,0,45.9\n"
        "MRN24508622,Wei Jones,1967-11-12,F,02192,617-555-8502,2020-03-25,0,31.7,CC,0,0,0,0,2023-03-25,0,0,98\n")
    events = folder / "events.csv"
    events.write_text("mrn,date,code,value,unit\n"
                      f"{mrn},2020-08-01,13457-7,92.54,mg/dL\n{mrn},2020-08-01,4548-4,5.91,%\n"
                      "MRN24508622,2020-03-01,13457-7,120.0,mg/dL\n")
    return patients, events


def pseudonym_of(site_dir: Path, mrn: str = MRN) -> str:
    """The site pseudonym of a raw identifier (what the ingest stored)."""
    from evoclone.privacy.pseudonym import Pseudonymizer
    from evoclone.site_node.settings import get_settings, load_key

    return Pseudonymizer(key=load_key(get_settings(site_dir))).pseudonym(mrn)


def _ingest(site_dir: Path, tmp: Path) -> str:
    from evoclone.site_node.pipeline import ingest_extract

    patients, events = write_extract(tmp / "extract")
    ingest_extract(site_dir=site_dir, patients_csv=patients, events_csv=events)
    return pseudonym_of(site_dir)


@pytest.fixture
def patient(site_dir, tmp_path) -> str:
    """The pseudonym of the planted patient, ingested into the SQLite site through the CSV pipeline."""
    return _ingest(site_dir, tmp_path)


@pytest.fixture
def settings(site_dir):
    """The site's settings (SQLite in the site directory)."""
    from evoclone.site_node.settings import get_settings

    return get_settings(site_dir)


@pytest.fixture
def pg_site(site_dir, db_url, tmp_path):
    """(settings, pseudonym) of a site on SQLite, then on a throwaway PostgreSQL database, the patient ingested."""
    import json

    from evoclone.site_node.settings import get_settings

    cfg = json.loads((site_dir / "site.json").read_text())
    (site_dir / "site.json").write_text(json.dumps({**cfg, "database_url": db_url}))
    get_settings.cache_clear()
    try:
        yield get_settings(site_dir), _ingest(site_dir, tmp_path)
    finally:
        get_settings.cache_clear()


@pytest.fixture
def redis_store() -> Iterator:
    """A session backend on the real Redis under a random namespace (its keys are removed afterwards)."""
    from evoclone.site_node.sessions import RedisBackend

    store = RedisBackend(url=REDIS, namespace=f"evoclone-test-{uuid.uuid4().hex[:12]}")
    store.ping()
    try:
        yield store
    finally:
        keys = list(store.client.scan_iter(match=f"{store.ns}:*"))
        if keys:
            store.client.delete(*keys)
        store.close()


def make_client(settings, clock: Clock, sessions=None, *, store_from_settings: bool = False) -> Iterator[TestClient]:
    """A test client of the app (schema migrated); an in-process session store unless one is given or
    `store_from_settings` (the settings' redis_url, as served)."""
    from evoclone.site_node.api.main import create_app
    from evoclone.site_node.sessions import MemoryBackend

    app = create_app(settings, clock=clock, sessions=None if store_from_settings else sessions or MemoryBackend())
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def client(settings, clock, patient) -> Iterator[TestClient]:
    """A test client of the app on the SQLite site holding the planted patient."""
    yield from make_client(settings, clock)


def add_user(client: TestClient, username: str, role: str, password: str = PASSWORD) -> str:
    """Create a user straight in the app's database; its TOTP secret."""
    from evoclone.site_node.auth import create_user
    from evoclone.site_node.auth_models import UserCreate

    with Session(client.app.state.engine) as session:
        _, secret = create_user(session=session, data=UserCreate(username=username, role=role, password=password),
                                totp_key=client.app.state.totp_key)
        session.commit()
    return secret


def code(secret: str, clock: Clock) -> str:
    """The TOTP code of `secret` at the clock's time."""
    return pyotp.TOTP(secret).at(clock())


def login(client: TestClient, username: str, secret: str, clock: Clock, password: str = PASSWORD) -> dict:
    """Log in (after moving the clock one TOTP step, since a code works once) and return the token pair."""
    clock.advance(30)
    r = client.post("/api/v1/auth/login", json={"username": username, "password": password,
                                                "totp_code": code(secret, clock)})
    assert r.status_code == 200, r.text
    return r.json()


def bearer(tokens: dict | str) -> dict[str, str]:
    """Authorization headers for a token pair or a token."""
    return {"Authorization": f"Bearer {tokens if isinstance(tokens, str) else tokens['access_token']}"}


@pytest.fixture
def headers_for(clock) -> Callable[[TestClient, str], dict[str, str]]:
    """`headers_for(client, role)`: Authorization headers of a new user with that role, logged in with TOTP."""
    made: dict[tuple[int, str], dict[str, str]] = {}

    def make(client: TestClient, role: str) -> dict[str, str]:
        key = (id(client), role)
        if key not in made:
            secret = add_user(client, f"{role}-user".replace("_", "-"), role)
            made[key] = bearer(login(client, f"{role}-user".replace("_", "-"), secret, clock))
        return made[key]

    return make


@pytest.fixture
def clinician(client, headers_for) -> dict[str, str]:
    """Authorization headers of a logged-in clinician on `client`."""
    return headers_for(client, "clinician")


@pytest.fixture
def admin(client, headers_for) -> dict[str, str]:
    """Authorization headers of a logged-in site admin on `client`."""
    return headers_for(client, "site_admin")
