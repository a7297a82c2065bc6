"""`evoclone deploy site|coordinator`: install or upgrade hosts with the project's Ansible playbooks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

deploy_app = typer.Typer(no_args_is_help=True,
                         help="Install or upgrade site nodes and the coordinator with Ansible (ansible-runner).")

Inventory = Annotated[Path, typer.Option("--inventory", "-i", help="Ansible inventory (file or directory)")]
Limit = Annotated[str | None, typer.Option("--limit", "-l", help="only these hosts or groups (Ansible pattern)")]
Check = Annotated[bool, typer.Option("--check", help="report the changes without making them (Ansible check mode)")]
ExtraVars = Annotated[list[str] | None, typer.Option("--extra-vars", "-e",
                                                     help="KEY=VALUE, JSON or @FILE, as for ansible-playbook "
                                                          "(repeatable)")]
VaultFile = Annotated[Path | None, typer.Option("--vault-password-file",
                                                help="file holding the Ansible Vault password of the inventory")]
Wheel = Annotated[Path | None, typer.Option("--wheel", help="the evoclone wheel to install (default: built from "
                                                            "this source tree)")]
Constraints = Annotated[Path | None, typer.Option("--constraints", help="pinned dependency versions (default: the "
                                                                        "source tree's constraints.txt)")]
AsJson = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]


@deploy_app.command("site")
def site(inventory: Inventory, limit: Limit = None, check: Check = False, extra_vars: ExtraVars = None,
         vault_password_file: VaultFile = None, wheel: Wheel = None, constraints: Constraints = None,
         as_json: AsJson = False) -> None:
    """Install or upgrade the hospitals' site nodes (the evoclone_sites group), one host at a time.

    Example: evoclone deploy site --inventory ansible/inventories/example/hosts.yml --vault-password-file ~/.vault-pass --limit hospital-a
    """
    _deploy("site", inventory, limit, check, extra_vars or [], vault_password_file, wheel, constraints, as_json)


@deploy_app.command("coordinator")
def coordinator(inventory: Inventory, limit: Limit = None, check: Check = False, extra_vars: ExtraVars = None,
                vault_password_file: VaultFile = None, wheel: Wheel = None, constraints: Constraints = None,
                as_json: AsJson = False) -> None:
    """Install or upgrade the coordinator (the evoclone_coordinators group): API workers, SuperLink, nginx.

    Example: evoclone deploy coordinator --inventory ansible/inventories/example/hosts.yml --vault-password-file ~/.vault-pass
    """
    _deploy("coordinator", inventory, limit, check, extra_vars or [], vault_password_file, wheel, constraints,
            as_json)


def _deploy(target: str, inventory: Path, limit: str | None, check: bool, extra_vars: list[str],
            vault_password_file: Path | None, wheel: Path | None, constraints: Path | None, as_json: bool) -> None:
    from .deploy_run import (ROOT, DeployError, dumps, print_changes, run_playbook, source_wheel, summary,
                             vaulted_files, wheel_version)
    from .main import err, fail

    try:
        if not inventory.exists():
            raise DeployError(f"inventory {inventory} does not exist; copy ansible/inventories/example and edit it")
        vault_env = os.environ.get("ANSIBLE_VAULT_PASSWORD_FILE")
        if vault_password_file is not None and not vault_password_file.is_file():
            raise DeployError(f"vault password file {vault_password_file} does not exist")
        locked = vaulted_files(inventory)
        if locked and vault_password_file is None and not vault_env:
            raise DeployError(f"{locked[0]} is encrypted with Ansible Vault and no vault password was given: pass "
                              "--vault-password-file FILE (or set ANSIBLE_VAULT_PASSWORD_FILE)")
        if wheel is not None and not wheel.is_file():
            raise DeployError(f"wheel {wheel} does not exist")
        if constraints is None and (ROOT / "constraints.txt").is_file():
            constraints = ROOT / "constraints.txt"
        if constraints is not None and not constraints.is_file():
            raise DeployError(f"constraints file {constraints} does not exist")
        if wheel is None:
            with err.status("building the evoclone wheel from the source tree"):
                wheel = source_wheel(Path(tempfile.gettempdir()) / f"evoclone-deploy-wheel-{os.getuid()}")
        version = wheel_version(wheel)
    except DeployError as exc:
        raise fail(str(exc), 2) from None
    prefix = "evoclone_site" if target == "site" else "evoclone_coordinator"
    extravars = {f"{prefix}_wheel": str(wheel.resolve()), f"{prefix}_version": version,
                 f"{prefix}_constraints": str(constraints.resolve()) if constraints else ""}
    err.print(f"deploying evoclone {version} ({target}{', check mode' if check else ''}) with {inventory}")
    progress, stats, rc = run_playbook(playbook=f"{target}.yml", inventory=inventory, extravars=extravars,
                                       extra_args=extra_vars, limit=limit, check=check,
                                       vault_password_file=vault_password_file, console=err)
    doc = summary(target=target, check=check, progress=progress, stats=stats, rc=rc)
    if progress.fatal:
        if as_json:
            typer.echo(dumps(doc))
        raise fail(f"ansible-playbook stopped before changing any host: {progress.fatal}", 2)
    if progress.hosts:
        err.print(progress.table(final=True, stats=stats))
    if check:
        print_changes(progress, err)
    if as_json:
        typer.echo(dumps(doc))
    if not doc["ok"]:
        hosts = ", ".join(doc["failed_hosts"]) or "no host ran"
        raise fail(f"deployment failed on {hosts}; the messages above say what to fix", 1)
