"""The request memo: a cached twin lookup reads no user, token or model row from the database, yet a revoked
token, a disabled user or a promoted model written by any process of the site is seen by the next request, and a
write made around the site's engines (SQL typed by hand) within `request_memo_seconds`."""

from __future__ import annotations

import subprocess
import sys
import time

import sqlalchemy as sa

from .conftest import bearer, make_client
from .twin_model import coordinator_key, model_dir, public_pem, signed_bundle  # noqa: F401 (fixtures)

R = {"reason": "treatment"}
WATCHED = ("site_user", "site_api_token", "local_model")


def _install(client, model_dir, key, version: str, *, pin: bool = True) -> None:  # noqa: F811
    from evoclone.site_node.local_models import install_bundle

    install_bundle(engine=client.app.state.engine, site_dir=client.app.state.settings.site_dir,
                   bundle=signed_bundle(model_dir, key, version=version),
                   public_key_pem=public_pem(key) if pin else None)


def _twins(client, headers, patient):
    return client.post(f"/api/v1/patients/{patient}/twins", params=R, headers=headers,
                       json={"arm": "treatment", "count": 2})


def _service_token(client, admin) -> tuple[int, str]:
    r = client.post("/api/v1/tokens", json={"name": "twin-batch", "role": "clinician"}, headers=admin)
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["token"]


def test_a_cached_lookup_reads_no_user_token_or_model_row(client, clinician, admin, patient, model_dir,  # noqa: F811
                                                          coordinator_key):  # noqa: F811
    _install(client, model_dir, coordinator_key, "v1")
    _, token = _service_token(client, admin)
    assert _twins(client, clinician, patient).headers["x-cache"] == "miss"
    for headers in (clinician, bearer(token)):  # the first request of each caller reads its row once
        assert _twins(client, headers, patient).headers["x-cache"] == "hit"
    statements: list[str] = []
    sa.event.listen(client.app.state.engine, "before_cursor_execute",
                    lambda _c, _cur, statement, *_: statements.append(statement))
    for headers in (clinician, bearer(token)) * 3:
        r = _twins(client, headers, patient)
        assert r.status_code == 200 and r.headers["x-cache"] == "hit", r.text
    read = [s for s in statements if any(t in s for t in WATCHED)]
    assert read == [], read
    assert any("access_log" in s for s in statements)  # every read is still logged, in the database


REVOKE_DISABLE_PROMOTE = r'''
import sys
from datetime import datetime, timezone
from pathlib import Path
from sqlmodel import Session, select
from evoclone.site_node.api_tokens import revoke_token
from evoclone.site_node.auth_models import SiteUser
from evoclone.site_node.db import site_engine
from evoclone.site_node.local_models import promote_version
from evoclone.site_node.settings import get_settings
engine = site_engine(get_settings(Path(sys.argv[1])))
now = datetime.now(timezone.utc)
with Session(engine) as s:
    revoke_token(session=s, token_id=int(sys.argv[2]), now=now)
    s.commit()
with Session(engine) as s:
    user = s.exec(select(SiteUser).where(SiteUser.username == "clinician-user")).one()
    user.disabled = True
    s.add(user)
    s.commit()
promote_version(engine=engine, version="v2", now=now)
'''


def test_writes_by_another_site_process_are_seen_by_the_next_request(client, clinician, admin, patient,
                                                                   model_dir, coordinator_key):  # noqa: F811
    _install(client, model_dir, coordinator_key, "v1")
    token_id, token = _service_token(client, admin)
    for headers in (clinician, bearer(token)):
        for _ in range(2):  # kept from the first request on
            r = _twins(client, headers, patient)
            assert r.status_code == 200 and r.json()["model_version"] == "v1", r.text
    from evoclone.site_node.local_models import install_bundle

    # v2 installed without promotion, then a CLI-like process revokes the token, disables the user, promotes v2
    install_bundle(engine=client.app.state.engine, site_dir=client.app.state.settings.site_dir,
                   bundle=signed_bundle(model_dir, coordinator_key, version="v2"), promote=False)
    assert _twins(client, admin, patient).json()["model_version"] == "v1"
    r = subprocess.run([sys.executable, "-c", REVOKE_DISABLE_PROMOTE, str(client.app.state.settings.site_dir),
                        str(token_id)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _twins(client, bearer(token), patient)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    r = _twins(client, clinician, patient)
    assert r.status_code == 401 and "disabled" in r.json()["detail"]
    r = _twins(client, admin, patient)
    assert r.status_code == 200 and r.json()["model_version"] == "v2" and r.headers["x-cache"] == "miss"


def _revoke_by_hand(url: str, token_id: int) -> None:
    """SQL typed into the database by hand: no site engine, so no data version change."""
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE site_api_token SET revoked_at = CURRENT_TIMESTAMP WHERE id = :i"), {"i": token_id})
    engine.dispose()


def _token_in_db(client, name: str) -> tuple[int, str]:
    from sqlmodel import Session

    from evoclone.site_node.api_tokens import issue_token
    from evoclone.site_node.auth_models import ApiTokenCreate

    with Session(client.app.state.engine) as session:
        row, token = issue_token(session=session, data=ApiTokenCreate(name=name, role="clinician"), created_by="t")
        session.commit()
        return row.id, token


def test_a_write_made_around_the_site_shows_within_the_time_limit(settings, clock, patient, monkeypatch):
    from evoclone.federated.stores import data_version

    for seconds in (30.0, 0.0):
        for client in make_client(settings.model_copy(update={"request_memo_seconds": seconds}), clock):
            token_id, token = _token_in_db(client, f"bot-{seconds:g}")
            me = lambda: client.get("/api/v1/auth/me", headers=bearer(token)).status_code  # noqa: E731
            assert me() == 200
            _revoke_by_hand(settings.db_url, token_id)
            if seconds:
                assert me() == 200  # kept: nothing told this process
                later = time.monotonic() + seconds + 1  # the documented bound: request_memo_seconds
                monkeypatch.setattr(data_version.time, "monotonic", lambda: later)
                assert me() == 401
                monkeypatch.undo()
            else:
                assert me() == 401  # no memo at all
