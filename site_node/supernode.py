"""The site's Flower SuperNode: the only process that lets the federation reach site data.

The ClientApp it runs reads the site's anonymized snapshot path and the database holding
its privacy ledger from the node config written here (mode 0600: a PostgreSQL URL may
carry a password); the SuperLink never learns them. The SuperNode process is the guarded
one (`flower_node`): runs of app bundles the site has not approved are refused.

Outside `--insecure` test mode the SuperNode verifies the SuperLink's TLS certificate
against the study CA and authenticates itself with its own key pair (registered at the
SuperLink by the coordinator).
"""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from evoclone.federated.flower.runtime import ProcessGroup, flower_env, http_ok

from .settings import SiteSettings


@dataclass(frozen=True)
class NodeSecurity:
    """TLS trust anchor and node authentication key of a SuperNode (None: --insecure)."""

    ca_cert: Path  # the study CA (verifies the SuperLink's certificate)
    node_key: Path  # the node's OpenSSH private key (its public half is registered at the SuperLink)

    def check(self) -> None:
        """Clear errors for missing files before a process is started."""
        for what, p in (("CA certificate", self.ca_cert), ("node private key", self.node_key)):
            if not Path(p).is_file():
                raise FileNotFoundError(f"{what} {p} does not exist; create it with `evoclone pki`")


def write_node_config(settings: SiteSettings, *, snapshot: Path | None = None) -> Path:
    """Write the node config (TOML) the ClientApp reads; returns its path."""
    from evoclone.federated.feedback import feedback_path

    path = (settings.site_dir / "node-config.toml").absolute()
    snapshot = (snapshot or settings.snapshot_path).resolve()
    text = tomli_w.dumps({
        "site-name": settings.name,
        "snapshot": str(snapshot),
        "feedback": str(feedback_path(snapshot)),  # the clinicians' verdicts the generator trains with
        "ledger": settings.db_url,  # the ledger lives in the site's transactional store
        "epsilon-budget": settings.epsilon_budget,
        "delta": settings.delta,
        "state-dir": str(settings.site_dir.resolve()),
    })
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def supernode_command(settings: SiteSettings, *, superlink: str, port: int, security: NodeSecurity | None,
                      host: str = "127.0.0.1") -> list[str]:
    """The guarded SuperNode's command line."""
    cmd = [sys.executable, "-m", "evoclone.site_node.flower_node", "--superlink", superlink, "--host", host,
           "--port", str(port), "--node-config", str(write_node_config(settings))]
    if security is None:
        return [*cmd, "--insecure"]
    security.check()
    return [*cmd, "--root-certificates", str(Path(security.ca_cert).resolve()),
            "--auth-supernode-private-key", str(Path(security.node_key).resolve())]


def start_supernode(settings: SiteSettings, *, superlink: str, port: int, group: ProcessGroup,
                    security: NodeSecurity | None = None, host: str = "127.0.0.1") -> str:
    """Start the site's guarded SuperNode (without waiting); returns its process name in the group."""
    name = f"supernode-{settings.name}"
    home = settings.site_dir / "flower"
    group.start(name, supernode_command(settings, superlink=superlink, port=port, security=security, host=host),
                env=flower_env(home), cwd=home)
    return name


def node_config_db(path: Path) -> str:
    """The site database URL a node config names (where approvals and the ledger live)."""
    return str(tomllib.loads(Path(path).read_text())["ledger"])


def supernode_healthy(*, port: int, host: str = "127.0.0.1") -> bool:
    """Whether a SuperNode's own API answers /health."""
    return http_ok(f"http://{host}:{port}/health")
