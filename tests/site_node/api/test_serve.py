"""A real `evoclone site serve` over TLS on a free loopback port, and a real Redis that goes away and returns."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyotp
import pytest
from typer.testing import CliRunner

from evoclone.cli.main import app

from ...servers import free_port
from .conftest import MRN, NAME, PASSWORD, add_user, bearer, code, login, make_client, write_extract

SERVE = [sys.executable, "-c", "from evoclone.cli.main import app; app()", "site", "serve"]


def _wait(ready, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    """Poll `ready` with a growing delay (never a fixed sleep) until it holds or the process dies."""
    deadline, delay = time.monotonic() + timeout, 0.02
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tls_site(tmp_path: Path) -> tuple[Path, Path]:
    from evoclone.privacy.pki import issue_server, new_ca

    ca_key, ca_cert = new_ca("test site CA")
    key, cert = issue_server(ca_key, ca_cert, "site-api", dns=["localhost"], ips=["127.0.0.1"])
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "ca.pem").write_bytes(ca_cert)
    (pki / "site.pem").write_bytes(cert)
    (pki / "site.key").write_bytes(key)
    (pki / "site.key").chmod(0o600)
    site = tmp_path / "site"
    r = CliRunner().invoke(app, ["site", "init", "--site-dir", str(site), "--name", "st-mary",
                                 "--tls-cert", str(pki / "site.pem"), "--tls-key", str(pki / "site.key")])
    assert r.exit_code == 0, r.output
    return site, pki / "ca.pem"


def test_serve_over_tls_answers_health_login_and_a_logged_read(tmp_path):
    from evoclone.site_node.pipeline import ingest_extract

    site, ca = _tls_site(tmp_path)
    patients, events = write_extract(tmp_path / "extract")
    ingest_extract(site_dir=site, patients_csv=patients, events_csv=events)
    r = CliRunner().invoke(app, ["site", "user", "add", "--site-dir", str(site), "--username", "ana",
                                 "--role", "clinician", "--password-stdin", "--json"], input=PASSWORD + "\n")
    assert r.exit_code == 0, r.output
    secret = json.loads(r.stdout)["totp_secret"]
    r = CliRunner().invoke(app, ["site", "user", "add", "--site-dir", str(site), "--username", "ana",
                                 "--role", "clinician", "--password-stdin"], input=PASSWORD + "\n")
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = CliRunner().invoke(app, ["site", "user", "add", "--site-dir", str(site), "--username", "bo",
                                 "--role", "root", "--password-stdin"], input=PASSWORD + "\n")
    assert r.exit_code == 2 and "--role 'root'" in r.stderr
    for cmd in (["serve"], ["user", "add"], ["audit", "verify"]):
        assert "Example: evoclone site" in CliRunner().invoke(app, ["site", *cmd, "--help"]).output

    port = free_port()
    ctx = ssl.create_default_context(cafile=str(ca))
    base = f"https://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([*SERVE, "--site-dir", str(site), "--port", str(port)], stdout=log, stderr=log,
                            start_new_session=True)

    def call(path: str, body: dict | None = None, headers: dict | None = None):
        req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:  # noqa: S310
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def healthy() -> bool:
        try:
            return call("/health") == (200, {"status": "ok"})
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    try:
        _wait(healthy, proc, "site serve")
        status, tokens = call("/api/v1/auth/login", {"username": "ana", "password": PASSWORD,
                                                     "totp_code": pyotp.TOTP(secret).now()})
        assert status == 200, tokens
        from .conftest import pseudonym_of

        status, body = call(f"/api/v1/patients/{pseudonym_of(site)}?reason=treatment", headers=bearer(tokens))
        assert status == 200 and body["n_events"] == 2
        assert call("/ready")[0] == 200
        with pytest.raises(OSError):  # plain HTTP is not served (the TLS server drops the connection)
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)  # noqa: S310
    finally:
        _stop(proc)
    log.seek(0)
    text = log.read()
    assert "GET /api/v1/patients/{pseudonym} 200" in text and MRN not in text and NAME not in text
    r = CliRunner().invoke(app, ["site", "audit", "verify", "--site-dir", str(site), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["entries"] == 1


def test_serve_refuses_a_missing_certificate(tmp_path):
    site, _ = _tls_site(tmp_path)
    (tmp_path / "pki" / "site.pem").unlink()
    r = CliRunner().invoke(app, ["site", "serve", "--site-dir", str(site), "--port", str(free_port())])
    assert r.exit_code == 2 and "does not exist" in r.stderr


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test on a free port: (url, start, stop)."""
    port = free_port()
    procs: list[subprocess.Popen] = []

    def start() -> None:
        import redis

        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(proc)
        client = redis.Redis(port=port, socket_connect_timeout=0.5)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        _wait(up, proc, "redis-server")
        client.close()

    def stop() -> None:
        proc = procs.pop()
        proc.terminate()
        proc.wait(timeout=10)

    start()
    try:
        yield f"redis://127.0.0.1:{port}/0", start, stop
    finally:
        while procs:
            stop()


def test_redis_down_refuses_logins_clearly_and_recovers(settings, clock, patient, own_redis):
    url, start, stop = own_redis
    for client in make_client(settings.model_copy(update={"redis_url": url}), clock,
                              store_from_settings=True):
        secret = add_user(client, "ana", "clinician")
        tokens = login(client, "ana", secret, clock)
        read = f"/api/v1/patients/{patient}?reason=review"
        assert client.get(read, headers=bearer(tokens)).status_code == 200
        stop()
        clock.advance(30)
        r = client.post("/api/v1/auth/login", json={"username": "ana", "password": PASSWORD,
                                                    "totp_code": code(secret, clock)})
        assert r.status_code == 503 and r.headers["retry-after"] == "5" and "Redis" in r.json()["detail"]
        r = client.get(read, headers=bearer(tokens))  # a session that cannot be checked is not trusted
        assert r.status_code == 503
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and "session store" in r.json()["detail"]
        start()  # an empty Redis: the sessions it held are gone, logins work again at once
        assert client.get("/ready").status_code == 200
        assert client.get(read, headers=bearer(tokens)).status_code == 401
        assert client.get(read, headers=bearer(login(client, "ana", secret, clock))).status_code == 200
