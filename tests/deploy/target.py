"""A throwaway deployment target on this machine: a temporary prefix reached with Ansible's
local connection, services run by start-stop-daemon (service manager `pidfile`), a study PKI
and a real TLS SuperLink for the SuperNode to connect to."""

from __future__ import annotations

import json
import os
import pwd
import grp
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
EVOCLONE = str(Path(sys.executable).parent / "evoclone")
# uv's download cache kept between test runs (like pip's): the first run on a machine downloads
UV_CACHE = Path(os.environ.get("EVOCLONE_TEST_UV_CACHE", Path.home() / ".cache" / "evoclone-test-uv"))
FIND_LINKS = [d for d in ("/opt/wheels",) if Path(d).is_dir()]  # this machine's local torch CPU wheel


def run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{args[:4]} exited {r.returncode}: {r.stderr[-2000:]}{r.stdout[-2000:]}")
    return r


def build_wheel(out: Path, *, version: str | None = None, patch: dict[str, tuple[str, str]] | None = None) -> Path:
    """The project's wheel; with `version`/`patch`, from a copy of the tree (tracked files) with that version
    and those edits."""
    src = REPO
    if version or patch:
        src = out / "src"
        files = run("git", "-C", str(REPO), "ls-files").stdout.split()
        for f in files:
            if (REPO / f).is_file() and not f.startswith(("tests/", "docs/", "benchmarks/")):
                (src / f).parent.mkdir(parents=True, exist_ok=True)
                (src / f).write_bytes((REPO / f).read_bytes())
        if version:
            p = src / "pyproject.toml"
            p.write_text(p.read_text().replace('version = "0.1.0"', f'version = "{version}"', 1))
        for rel, (old, new) in (patch or {}).items():
            p = src / rel
            text = p.read_text()
            assert old in text, f"{old!r} not in {rel}"
            p.write_text(text.replace(old, new, 1))
    wheels = out / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheels), str(src))
    return next(wheels.glob(f"evoclone-{version or '0.1.0'}-*.whl"))


@dataclass
class Target:
    """One local 'host' under a temporary prefix."""

    name: str
    prefix: Path
    api_port: int
    supernode_port: int

    @property
    def home(self) -> Path:
        return self.prefix / "opt" / "evoclone"

    @property
    def site_dir(self) -> Path:
        return self.prefix / "var" / "lib" / "evoclone" / "site"

    @property
    def log_dir(self) -> Path:
        return self.prefix / "var" / "log" / "evoclone"

    def host_vars(self, pki: Path, superlink: str) -> dict:
        user = pwd.getpwuid(os.getuid()).pw_name
        return {
            "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "evoclone_site_name": self.name, "evoclone_site_home": str(self.home),
            "evoclone_site_dir": str(self.site_dir), "evoclone_site_config_dir": str(self.prefix / "etc" / "evoclone"),
            "evoclone_site_log_dir": str(self.log_dir), "evoclone_site_systemd_dir": str(self.prefix / "etc" / "systemd"),
            "evoclone_site_service_manager": "pidfile", "evoclone_site_manage_user": False,
            "evoclone_site_user": user, "evoclone_site_group": grp.getgrgid(os.getgid()).gr_name,
            "evoclone_site_python": _python311(), "evoclone_site_find_links": FIND_LINKS,
            "evoclone_site_uv_cache_dir": str(UV_CACHE),
            "evoclone_site_api_host": "127.0.0.1", "evoclone_site_api_port": self.api_port,
            "evoclone_site_api_health_host": "127.0.0.1", "evoclone_site_supernode_port": self.supernode_port,
            "evoclone_site_tls_cert": str(pki / "site-api.pem"), "evoclone_site_tls_key": str(pki / "site-api.key"),
            "evoclone_site_ca_cert": str(pki / "ca.pem"), "evoclone_site_superlink": superlink,
            "evoclone_site_node_key_fetch_dir": str(self.prefix.parent / "node-keys"),
            "evoclone_site_min_free_gb": 1, "evoclone_site_health_timeout": 90,
        }

    def pid(self, service: str) -> int | None:
        p = self.log_dir / f"{service}.pid"
        return int(p.read_text()) if p.is_file() else None

    def stop(self) -> None:
        for svc in ("evoclone-supernode", "evoclone-site-api"):
            p = self.log_dir / f"{svc}.pid"
            if p.is_file():
                subprocess.run(["start-stop-daemon", "--stop", "--quiet", "--pidfile", str(p), "--remove-pidfile",
                                "--retry", "TERM/20/KILL/5"], capture_output=True)


def _python311() -> str:
    """A CPython 3.11 outside any virtualenv (what a host's /usr/bin/python3.11 is)."""
    return run(sys.executable, "-c", "import sys; print(sys._base_executable)").stdout.strip()


def make_pki(pki: Path) -> None:
    """Study CA, the site API's certificate (for 127.0.0.1) and the SuperLink's."""
    run(EVOCLONE, "pki", "init", "--dir", str(pki))
    run(EVOCLONE, "pki", "issue", "server", "site-api", "--dir", str(pki), "--ip", "127.0.0.1", "--dns", "localhost")
    run(EVOCLONE, "pki", "issue", "server", "superlink", "--dir", str(pki), "--ip", "127.0.0.1", "--dns", "localhost")


def write_inventory(path: Path, hosts: dict[str, dict]) -> Path:
    path.write_text(yaml.safe_dump({"all": {"children": {"evoclone_sites": {"hosts": hosts}}}}))
    return path


def deploy(inventory: Path, *extra: str, wheel: Path | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """`evoclone deploy site --json` as hospital IT runs it; returns the process and its JSON summary."""
    args = [EVOCLONE, "deploy", "site", "--inventory", str(inventory), "--json",
            "-e", "evoclone_deploy_become=false", *extra]
    if wheel is not None:
        args += ["--wheel", str(wheel)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    try:
        doc = json.loads(r.stdout) if r.stdout.strip() else {}
    except ValueError:
        raise AssertionError(f"deploy printed no JSON (rc {r.returncode}): {r.stderr[-3000:]}") from None
    return r, doc


# a release whose site API exits at start: its health check fails and the upgrade is rolled back
BROKEN_SERVE = {"cli/site_service.py": (
    '    settings = _settings(site_dir)\n    if settings.tls_enabled and not',
    '    raise SystemExit("this build cannot serve")\n    settings = _settings(site_dir)\n    if settings.tls_enabled and not')}


@dataclass
class Study:
    """A study PKI, a TLS SuperLink with node authentication, and one target whose SuperNode key (made
    beforehand, which the role keeps) is registered there; `inventory` deploys that target."""

    pki: Path
    target: Target
    link: object
    group: object
    node_id: str | None
    inventory: Path

    def stop(self) -> None:
        self.target.stop()
        self.group.stop()


def start_study(base: Path, name: str) -> Study:
    from evoclone.coordinator.superlink import LinkSecurity, SuperLink
    from evoclone.federated.flower.runtime import ProcessGroup

    pki = base / "pki"
    make_pki(pki)
    target = Target(name, base / name, free_port(), free_port())
    tls_dir = target.prefix / "etc" / "evoclone" / "tls"
    run(EVOCLONE, "pki", "issue", "node", name, "--dir", str(tls_dir))
    group = ProcessGroup(base / "link-logs")
    link = SuperLink(flower_dir=base / "link", port=free_port(), group=group,
                     security=LinkSecurity(ca_cert=pki / "ca.pem", cert=pki / "superlink.pem", key=pki / "superlink.key"))
    link.start()
    node_id = link.register_node_id(tls_dir / f"{name}.node.pub", name=name)
    inventory = write_inventory(base / "hosts.yml", {name: target.host_vars(pki, link.address)})
    return Study(pki=pki, target=target, link=link, group=group, node_id=node_id, inventory=inventory)


__all__ = ["BROKEN_SERVE", "Study", "start_study", "Target", "build_wheel", "deploy", "free_port", "make_pki", "write_inventory"]
