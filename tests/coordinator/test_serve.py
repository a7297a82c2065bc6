"""`evoclone coordinator init|user add|serve`: the CLI, and a real server process over HTTPS with its SuperLink."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evoclone.cli.coordinator import coordinator_app
from evoclone.federated.flower.runtime import free_port, http_ok, port_is_free

from .conftest import PASSWORD, enrol_payload

SERVE = [sys.executable, "-c", "from evoclone.cli.coordinator import coordinator_app; coordinator_app()", "serve"]


def _init(tmp_path: Path, *extra: str) -> Path:
    d = tmp_path / "coord"
    r = CliRunner().invoke(coordinator_app, ["init", "--state-dir", str(d), "--json", *extra])
    assert r.exit_code == 0, r.output
    return d


def test_init_writes_private_keys_0600_and_refuses_to_overwrite(tmp_path):
    d = _init(tmp_path, "--superlink-port", str(free_port()))
    for secret in ("jwt.secret", "signing.key", "coordinator.json", "pki/ca.key", "pki/coordinator.key",
                   "pki/superlink.key"):
        assert (d / secret).stat().st_mode & 0o777 == 0o600, secret
    assert len((d / "jwt.secret").read_text()) >= 48
    r = CliRunner().invoke(coordinator_app, ["init", "--state-dir", str(d)])
    assert r.exit_code == 1 and "never overwritten" in r.output
    (d / "jwt.secret").chmod(0o644)
    r = CliRunner().invoke(coordinator_app, ["user", "add", "--state-dir", str(d), "--username", "ana",
                                             "--role", "admin", "--password-stdin"], input=PASSWORD + "\n")
    assert r.exit_code == 2 and "readable by others" in r.output


def test_user_add(tmp_path):
    d = _init(tmp_path)
    args = ["user", "add", "--state-dir", str(d), "--username", "ana", "--role", "sponsor", "--password-stdin"]
    assert CliRunner().invoke(coordinator_app, args, input=PASSWORD + "\n").exit_code == 0
    r = CliRunner().invoke(coordinator_app, args, input=PASSWORD + "\n")
    assert r.exit_code == 1 and "already exists" in r.output
    r = CliRunner().invoke(coordinator_app, [*args[:-3], "--role", "root", "--password-stdin"], input=PASSWORD)
    assert r.exit_code == 2 and "--role 'root' is not one of" in r.output
    r = CliRunner().invoke(coordinator_app, [*args[:4], "--username", "bo", "--role", "sponsor", "--password-stdin"],
                           input="short\n")
    assert r.exit_code == 2 and "--password" in r.output
    r = CliRunner().invoke(coordinator_app, ["user", "add", "--state-dir", str(tmp_path / "nope"), "--username", "x",
                                             "--role", "admin", "--password-stdin"], input=PASSWORD)
    assert r.exit_code == 2 and "evoclone coordinator init" in r.output
    for cmd in (["init"], ["serve"], ["user", "add"]):
        assert "Example: evoclone coordinator" in CliRunner().invoke(coordinator_app, [*cmd, "--help"]).output


def _wait(predicate, what: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline, delay = time.monotonic() + timeout, 0.05
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode} while waiting for {what}: "
                                 f"{proc.stderr.read()[-2000:] if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _call(url: str, ca: Path, *, data: dict | None = None, token: str | None = None, method: str | None = None):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                 headers={"content-type": "application/json",
                                          **({"authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(ca)), timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("superlink", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["api-only", "with-superlink"])  # slow: a real Flower SuperLink
def test_serve_https_health_superlink_sync_and_sigterm(tmp_path, superlink):
    link_port = free_port()
    d = _init(tmp_path, "--superlink-port", str(link_port))
    r = CliRunner().invoke(coordinator_app, ["user", "add", "--state-dir", str(d), "--username", "root",
                                             "--role", "admin", "--password-stdin"], input=PASSWORD + "\n")
    assert r.exit_code == 0, r.output
    port, ca = free_port(), d / "pki" / "ca.pem"
    base = f"https://127.0.0.1:{port}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [*SERVE, "--state-dir", str(d), "--port", str(port), *([] if superlink else ["--no-superlink"])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait(lambda: http_ok(f"{base}/health", cafile=ca), "HTTPS /health", proc)
        assert not http_ok(f"http://127.0.0.1:{port}/health")  # TLS only
        token = _call(f"{base}/api/v1/auth/token", ca, data={"username": "root", "password": PASSWORD})["access_token"]
        site = _call(f"{base}/api/v1/sites/enrol", ca, data=enrol_payload("site-a"))
        _call(f"{base}/api/v1/sites/{site['id']}/accept", ca, data={}, token=token)
        registry = d / "flower" / "registered-nodes.json"
        if superlink:
            assert http_ok(f"https://127.0.0.1:{link_port}/health", cafile=ca)
            _wait(lambda: "site-a" in (json.loads(registry.read_text()) if registry.exists() else {}),
                  "the SuperNode key to be registered", proc)
            assert json.loads(registry.read_text())["site-a"][1]  # the SuperLink gave it a node id
            _call(f"{base}/api/v1/sites/{site['id']}/revoke", ca, data={}, token=token)
            _wait(lambda: "site-a" not in json.loads(registry.read_text()), "the revoked key to be withdrawn", proc)
        else:
            assert not registry.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert rc == 0, proc.stderr.read()[-2000:]
    assert port_is_free(port) and port_is_free(link_port)
