"""Drive the Ansible playbooks through ansible-runner: live per-host progress, a per-host
summary, the changes a --check run would make, and one clear line per failure."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]  # the source tree, or site-packages/evoclone in an installed wheel
VAULT_HEADER = b"$ANSIBLE_VAULT;"
COUNTERS = ("ok", "changed", "failed", "unreachable", "skipped")


class DeployError(Exception):
    """Bad input found before Ansible starts (exit code 2)."""


def playbook_dir() -> Path:
    """The folder holding site.yml, coordinator.yml and roles/."""
    path = ROOT / "ansible"
    if not (path / "site.yml").is_file():
        raise DeployError(f"the Ansible playbooks are missing from {path}; reinstall evoclone")
    return path


def vaulted_files(inventory: Path) -> list[Path]:
    """Files of an inventory (and its group_vars/host_vars) encrypted with Ansible Vault."""
    base = inventory if inventory.is_dir() else inventory.parent
    candidates = [inventory] if inventory.is_file() else []
    for sub in ("group_vars", "host_vars"):
        if (base / sub).is_dir():
            candidates += [p for p in sorted((base / sub).rglob("*")) if p.is_file()]
    found = []
    for p in candidates:
        try:
            with p.open("rb") as f:
                if f.read(len(VAULT_HEADER)) == VAULT_HEADER:
                    found.append(p)
        except OSError:
            continue
    return found


def source_wheel(out_dir: Path) -> Path:
    """Build the EvoClone wheel from this source tree (a deployment from a checkout)."""
    if not (ROOT / "pyproject.toml").is_file():
        raise DeployError("this evoclone is installed from a wheel, not a source tree: pass --wheel FILE "
                          "(the evoclone-X.Y.Z-py3-none-any.whl to deploy)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("evoclone-*.whl"):
        old.unlink()
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out_dir),
                        str(ROOT)], capture_output=True, text=True)
    wheels = sorted(out_dir.glob("evoclone-*.whl"))
    if r.returncode != 0 or not wheels:
        raise DeployError(f"building the evoclone wheel failed: {(r.stderr or r.stdout).strip()[-300:]}")
    return wheels[0]


def wheel_version(wheel: Path) -> str:
    """The version in a wheel's file name (evoclone-0.1.0-py3-none-any.whl -> 0.1.0)."""
    m = re.match(r"^evoclone-([^-]+)-[^-]+-[^-]+-[^-]+\.whl$", wheel.name)
    if m is None:
        raise DeployError(f"{wheel} is not an evoclone wheel (expected evoclone-X.Y.Z-py3-none-any.whl)")
    return m.group(1)


@dataclass
class Progress:
    """What the event stream has said so far, per host."""

    hosts: dict[str, dict[str, int | str]] = field(default_factory=dict)
    changes: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    play: str = ""
    warnings: list[str] = field(default_factory=list)
    fatal: str = ""

    def host(self, name: str) -> dict[str, int | str]:
        return self.hosts.setdefault(name, {**{k: 0 for k in COUNTERS}, "task": ""})

    def handle(self, event: dict) -> None:
        """Fold one ansible-runner event into the counters."""
        kind, data = event.get("event", ""), event.get("event_data", {})
        if kind == "playbook_on_play_start":
            self.play = data.get("play", "")
        host = data.get("host")
        if kind == "runner_on_start" and host:
            self.host(host)["task"] = data.get("task", "")
        elif kind == "runner_on_ok" and host:
            h = self.host(host)
            h["ok"] += 1
            if data.get("res", {}).get("changed"):
                h["changed"] += 1
                self.changes.append({"host": host, "task": data.get("task", "")})
        elif kind == "runner_on_skipped" and host:
            self.host(host)["skipped"] += 1
        elif kind == "runner_on_failed" and host and not data.get("ignore_errors"):
            self.host(host)["failed"] += 1
            self.errors.append({"host": host, "task": data.get("task", ""), "message": _message(data.get("res", {}))})
        elif kind == "runner_on_unreachable" and host:
            self.host(host)["unreachable"] += 1
            self.errors.append({"host": host, "task": data.get("task", ""),
                                "message": f"unreachable: {_message(data.get('res', {}))}; check the address and "
                                           f"SSH access (ansible -i INVENTORY {host} -m ansible.builtin.ping)"})
        elif kind == "verbose" and not self.hosts and not self.fatal and _error_line(event.get("stdout", "")):
            self.fatal = _error_line(event["stdout"])

    def table(self, *, final: bool = False, stats: dict | None = None) -> Table:
        """Per-host counters; the final one uses Ansible's own recap."""
        t = Table("host", *COUNTERS, *(("status",) if final else ("task",)),
                  title=("deployment summary" if final else f"deploying: {self.play}"))
        for name in sorted(self.hosts):
            h = dict(self.hosts[name])
            if stats:
                h.update(_recap(stats, name))
            if final:
                bad = h["failed"] or h["unreachable"]
                last = next((e["message"] for e in reversed(self.errors) if e["host"] == name), "")
                status = f"[red]{last[:160]}[/red]" if bad else "[green]ok[/green]"
            else:
                status = str(h["task"])[:60]
            t.add_row(name, *(str(h[k]) for k in COUNTERS), status)
        return t


def _recap(stats: dict, host: str) -> dict[str, int]:
    g = lambda k: int(stats.get(k, {}).get(host, 0))  # noqa: E731
    return {"ok": g("ok"), "changed": g("changed"), "failed": g("failures"), "unreachable": g("dark"),
            "skipped": g("skipped")}


def _message(res: dict) -> str:
    """The most useful line of a failed task's result (a failed loop item's own message first)."""
    for item in res.get("results") or []:
        if isinstance(item, dict) and (item.get("failed") or item.get("unreachable")):
            label = item.get("_ansible_item_label", item.get("item", ""))
            return f"{label}: {_message(item)}" if label and not isinstance(label, dict) else _message(item)
    for key in ("msg", "stderr", "module_stderr", "stdout"):
        value = res.get(key)
        if value:
            text = " ".join(str(value).split())
            return text[:400]
    return "failed (no message; rerun with ANSIBLE_VERBOSITY=2)"


def run_playbook(*, playbook: str, inventory: Path, extravars: dict, extra_args: list[str], limit: str | None,
                 check: bool, vault_password_file: Path | None, console: Console) -> tuple[Progress, dict, int]:
    """Run one playbook; returns the progress record, Ansible's recap stats and ansible-playbook's exit code."""
    import ansible_runner

    pdir = playbook_dir()
    cmdline = [f"--extra-vars={a}" for a in extra_args]
    if check:
        cmdline += ["--check", "--diff"]
    if vault_password_file is not None:
        cmdline.append(f"--vault-password-file={vault_password_file.resolve()}")
    progress = Progress()
    bindir = str(Path(sys.executable).parent)
    env = {"ANSIBLE_CONFIG": str(pdir / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(pdir / "roles"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    private = Path(tempfile.mkdtemp(prefix="evoclone-deploy-"))
    try:
        with Live(progress.table(), console=console, refresh_per_second=4, transient=True) as live:
            def on_event(event: dict) -> bool:
                progress.handle(event)
                live.update(progress.table())
                return True

            runner = ansible_runner.run(private_data_dir=str(private), project_dir=str(pdir), playbook=playbook,
                                        inventory=str(inventory.resolve()), limit=limit, extravars=extravars,
                                        cmdline=" ".join(shlex.quote(a) for a in cmdline), envvars=env,
                                        event_handler=on_event, quiet=True, suppress_env_files=True)
        stats = runner.stats or {}
        if not progress.fatal and runner.rc != 0 and not stats:
            progress.fatal = _last_error(runner)
        return progress, stats, int(runner.rc or 0)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _last_error(runner) -> str:
    """ansible-playbook's own error when it stopped before any host ran (bad inventory, vault, syntax)."""
    try:
        text = runner.stdout.read()
    except (OSError, AttributeError, ValueError):
        return f"ansible-playbook exited with {runner.rc}"
    if _error_line(text):
        return _error_line(text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:400] if lines else f"ansible-playbook exited with {runner.rc}"


def _error_line(text: str) -> str:
    """The message of Ansible's first error line ("[ERROR]: ..." in ansible-core 2.19, "ERROR! ..." before)."""
    m = re.search(r"(?:\[ERROR\]:|ERROR!)\s*(.+)", re.sub(r"\x1b\[[0-9;]*m", "", text))
    return " ".join(m.group(1).split())[:400] if m else ""


def summary(*, target: str, check: bool, progress: Progress, stats: dict, rc: int) -> dict:
    """The --json document."""
    hosts = {name: _recap(stats, name) if stats else {k: int(v) for k, v in h.items() if k in COUNTERS}
             for name, h in progress.hosts.items()}
    failed = sorted(h for h, c in hosts.items() if c["failed"] or c["unreachable"])
    return {"target": target, "check": check, "ok": rc == 0 and not failed and not progress.fatal,
            "hosts": hosts, "failed_hosts": failed, "changes": progress.changes if check else [],
            "errors": progress.errors + ([{"host": "", "task": "", "message": progress.fatal}] if progress.fatal else []),
            "rc": rc}


def print_changes(progress: Progress, console: Console) -> None:
    """What a --check run would change, per host and task."""
    if not progress.changes:
        console.print("check mode: no changes would be made")
        return
    t = Table("host", "task that would change", title="planned changes (check mode: nothing was changed)")
    for c in progress.changes:
        t.add_row(c["host"], c["task"])
    console.print(t)


def dumps(doc: dict) -> str:
    """Stable JSON for --json."""
    return json.dumps(doc, indent=1, sort_keys=False)
