"""The roles and playbooks pass ansible-lint's production profile and ansible-playbook --syntax-check
(with the example inventory and its Vault file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"
BIN = Path(sys.executable).parent
EXAMPLE_VAULT_PASSWORD = "evoclone-example"  # documented in ansible/inventories/example/README.md


def _env() -> dict[str, str]:
    return {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "PATH": f"{BIN}:{os.environ['PATH']}",
            "ANSIBLE_NOCOLOR": "1"}


def test_ansible_lint_production_profile_passes():
    r = subprocess.run([str(BIN / "ansible-lint"), "--profile", "production", "--offline", "--nocolor"], cwd=ANSIBLE,
                       capture_output=True, text=True, env=_env(), timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Profile 'production' was required, and it passed" in out
    linted = [ln for ln in out.splitlines() if "files processed" in ln]
    assert linted and int(linted[0].split(" in ")[1].split()[0]) > 100  # every role and playbook was read


@pytest.mark.parametrize("playbook", ["site.yml", "coordinator.yml"])
def test_playbook_syntax_with_the_example_inventory_and_vault(playbook, tmp_path):
    pw = tmp_path / "vault-pass"
    pw.write_text(EXAMPLE_VAULT_PASSWORD + "\n")
    r = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "-i", "inventories/example/hosts.yml",
                        "--vault-password-file", str(pw), playbook], cwd=ANSIBLE, capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    # the example's secrets decrypt with the documented password and reach the site variables
    r = subprocess.run([str(BIN / "ansible-inventory"), "-i", "inventories/example/hosts.yml", "--vault-password-file",
                        str(pw), "--host", "hospital-a.example.org"], cwd=ANSIBLE, capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 0 and '"vault_site_postgres_password": "example-postgres-' in r.stdout
