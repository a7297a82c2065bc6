"""`evoclone deploy site` converging the evoclone_site role onto a throwaway target on this machine
(a temporary prefix, Ansible's local connection, services under start-stop-daemon), twice, verified
over TLS and against a real SuperLink; check mode; an upgrade, and a broken upgrade rolled back."""

from __future__ import annotations

import hashlib
import json
import socket
import sqlite3
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from .target import BROKEN_SERVE, EVOCLONE, Target, build_wheel, deploy, free_port, start_study, write_inventory

pytestmark = pytest.mark.slow


def _health(target: Target, ca: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(f"https://127.0.0.1:{target.api_port}/health", context=ctx, timeout=10) as r:
        return r.status


def _wait(cond, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.5)  # polling a condition, not waiting for a fixed time
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A SuperLink (TLS, node authentication) and one target whose SuperNode key is registered there."""
    base = tmp_path_factory.mktemp("deploy")
    study = start_study(base, "site-a")
    wheel = build_wheel(base / "v0")
    try:
        yield {"base": base, "pki": study.pki, "target": study.target, "link": study.link,
               "inventory": study.inventory, "wheel": wheel, "node_id": study.node_id}
    finally:
        study.stop()


def test_converges_twice_with_zero_changes_then_serves_tls_health_and_connects(site):
    t: Target = site["target"]
    r1, doc1 = deploy(site["inventory"], wheel=site["wheel"])
    assert r1.returncode == 0, doc1.get("errors") or r1.stderr[-3000:]
    assert doc1["ok"] and doc1["hosts"]["site-a"]["changed"] > 10
    assert "deployment summary" in r1.stderr  # the per-host table

    # what the role installed
    current = t.home / "current"
    assert current.is_symlink() and current.resolve().name == "0.1.0"
    assert (t.site_dir / "secret.key").stat().st_mode & 0o777 == 0o600
    settings = json.loads((t.site_dir / "site.json").read_text())
    assert settings["name"] == "site-a" and settings["tls_cert"].endswith("/tls/api.pem")
    unit = (t.prefix / "etc" / "systemd" / "evoclone-supernode.service").read_text()
    assert "Restart=always" in unit and "MemoryMax=" in unit and "NoNewPrivileges=yes" in unit
    assert f"ExecStart={t.home}/current/venv/bin/evoclone site node" in unit
    assert (site["base"] / "node-keys" / "site-a.node.pub").read_bytes() == \
        (t.prefix / "etc" / "evoclone" / "tls" / "site-a.node.pub").read_bytes()

    # verify: the site API over TLS (verified against the CA) and the SuperNode online at the SuperLink
    assert _health(t, site["pki"] / "ca.pem") == 200
    assert site["node_id"]
    _wait(lambda: any(n["node-id"] == site["node_id"] and n["status"] == "online" for n in site["link"].nodes()),
          "the site's SuperNode to come online at the SuperLink")
    pids = (t.pid("evoclone-site-api"), t.pid("evoclone-supernode"))

    r2, doc2 = deploy(site["inventory"], wheel=site["wheel"])
    assert r2.returncode == 0, doc2.get("errors")
    assert doc2["hosts"]["site-a"]["changed"] == 0, doc2
    assert (t.pid("evoclone-site-api"), t.pid("evoclone-supernode")) == pids  # nothing restarted

    # check mode with a new budget: reported, not made
    before = (t.site_dir / "site.json").read_bytes()
    r3, doc3 = deploy(site["inventory"], "--check", "-e", "evoclone_site_epsilon=1.5", wheel=site["wheel"])
    assert r3.returncode == 0, doc3.get("errors")
    assert doc3["check"] and {"host": "site-a", "task": "Write the site settings"} in doc3["changes"]
    assert "planned changes" in r3.stderr
    assert (t.site_dir / "site.json").read_bytes() == before
    assert (t.pid("evoclone-site-api"), t.pid("evoclone-supernode")) == pids


def _users(t: Target) -> int:
    with sqlite3.connect(t.site_dir / "site.db") as db:
        return db.execute("select count(*) from site_user").fetchone()[0]


def test_upgrade_keeps_data_and_a_broken_upgrade_rolls_back(site):
    t: Target = site["target"]
    if not (t.home / "current").exists():
        r, doc = deploy(site["inventory"], wheel=site["wheel"])
        assert r.returncode == 0, doc.get("errors")
    bin_ = t.home / "current" / "venv" / "bin" / "evoclone"
    subprocess.run([str(bin_), "site", "user", "add", "--site-dir", str(t.site_dir), "--username", "ana",
                    "--role", "clinician", "--password-stdin", "--json"], input="correct horse battery 9\n",
                   check=True, capture_output=True, text=True)
    key = hashlib.sha256((t.site_dir / "secret.key").read_bytes()).hexdigest()
    users, old_pid = _users(t), t.pid("evoclone-site-api")

    good = build_wheel(site["base"] / "v1", version="0.1.1")
    r, doc = deploy(site["inventory"], wheel=good)
    assert r.returncode == 0, doc.get("errors")
    assert (t.home / "current").resolve().name == "0.1.1" and (t.home / "previous").resolve().name == "0.1.0"
    assert (t.home / "backups" / "site-0.1.0.db").is_file()
    assert t.pid("evoclone-site-api") != old_pid and _health(t, site["pki"] / "ca.pem") == 200
    assert hashlib.sha256((t.site_dir / "secret.key").read_bytes()).hexdigest() == key and _users(t) == users

    broken = build_wheel(site["base"] / "v2", version="0.1.2", patch=BROKEN_SERVE)
    r, doc = deploy(site["inventory"], "-e", "evoclone_site_health_timeout=14", wheel=broken)
    assert r.returncode == 1 and doc["failed_hosts"] == ["site-a"]
    message = doc["errors"][-1]["message"]
    assert "EvoClone 0.1.2 did not come up" in message and "rolled back to 0.1.1" in message, message
    assert (t.home / "current").resolve().name == "0.1.1"
    assert _health(t, site["pki"] / "ca.pem") == 200 and _users(t) == users
    assert "error:" in r.stderr and "site-a" in r.stderr


def test_bad_hosts_stop_every_host_before_any_change(site, tmp_path):
    pki, wheel = site["pki"], site["wheel"]
    hosts, targets = {}, {}
    for name in ("site-b", "site-c", "site-d", "site-e"):
        t = Target(name, tmp_path / name, free_port(), free_port())
        targets[name] = t
        hosts[name] = t.host_vars(pki, "127.0.0.1:9093")
    hosts["site-c"]["evoclone_site_min_free_gb"] = 10 ** 7  # no disk has 10 PiB free
    hosts["site-d"].update(ansible_connection="ssh", ansible_host="127.0.0.1", ansible_port=free_port(),
                           ansible_user="nobody")  # nothing listens there: unreachable
    inventory = write_inventory(tmp_path / "hosts.yml", hosts)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", targets["site-b"].api_port))
        busy.listen()
        r, doc = deploy(inventory, wheel=Path("/nonexistent/evoclone-0.1.0-py3-none-any.whl"))
    assert r.returncode == 2 and "wheel /nonexistent" in r.stderr  # checked before Ansible starts

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", targets["site-b"].api_port))
        busy.listen()
        r, doc = deploy(inventory, wheel=wheel)
    assert r.returncode == 1, r.stderr[-2000:]
    by_host = {e["host"]: e["message"] for e in doc["errors"]}
    assert f"port {targets['site-b'].api_port} (evoclone-site-api) is already in use" in by_host["site-b"]
    assert "GiB needed" in by_host["site-c"] and "evoclone_site_min_free_gb" in by_host["site-c"]
    assert "unreachable" in by_host["site-d"] and "ansible.builtin.ping" in by_host["site-d"]
    assert "not deployed because site-b, site-c, site-d failed the preflight checks" in by_host["site-e"]
    for t in targets.values():  # not even the healthy host was touched
        assert not (t.home).exists() and not t.site_dir.exists()


def test_missing_vault_password_is_refused_before_ansible_starts(tmp_path):
    inventory = tmp_path / "inv"
    (inventory / "group_vars" / "all").mkdir(parents=True)
    (inventory / "hosts.yml").write_text("all:\n  children:\n    evoclone_sites:\n      hosts:\n        h1: {}\n")
    secret = inventory / "group_vars" / "all" / "vault.yml"
    secret.write_text("evoclone_site_database_url: postgresql+psycopg://u:p@127.0.0.1/db\n")
    pw = tmp_path / "pw"
    pw.write_text("example vault password\n")
    subprocess.run([str(Path(EVOCLONE).parent / "ansible-vault"), "encrypt", "--vault-password-file", str(pw),
                    str(secret)], check=True, capture_output=True)
    r = subprocess.run([EVOCLONE, "deploy", "site", "--inventory", str(inventory), "--wheel", str(pw)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "vault.yml is encrypted with Ansible Vault" in r.stderr and "--vault-password-file" in r.stderr
