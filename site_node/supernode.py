"""The site's Flower SuperNode: the only process that lets the federation reach site data.

The ClientApp it runs reads the site's anonymized snapshot path and the database holding
its privacy ledger from the node config written here (mode 0600: a PostgreSQL URL may
carry a password); the SuperLink never learns them.
"""

from __future__ import annotations

import os
from pathlib import Path

import tomli_w

from evoclone.federated.flower.runtime import ProcessGroup, flower_env, http_ok

from .settings import SiteSettings


def write_node_config(settings: SiteSettings) -> Path:
    """Write the node config (TOML) the ClientApp reads; returns its path."""
    path = (settings.site_dir / "node-config.toml").absolute()
    text = tomli_w.dumps({
        "site-name": settings.name,
        "snapshot": str(settings.snapshot_path.resolve()),
        "ledger": settings.db_url,  # the ledger lives in the site's transactional store
        "epsilon-budget": settings.epsilon_budget,
        "delta": settings.delta,
    })
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def start_supernode(settings: SiteSettings, *, superlink: str, port: int, group: ProcessGroup,
                    host: str = "127.0.0.1") -> str:
    """Start the site's SuperNode (without waiting); returns its process name in the group."""
    name = f"supernode-{settings.name}"
    cmd = ["flower-supernode", "--insecure", "--superlink", superlink, "--host", host, "--port", str(port),
           "--node-config", str(write_node_config(settings))]
    home = settings.site_dir / "flower"
    group.start(name, cmd, env=flower_env(home), cwd=home)
    return name


def supernode_healthy(*, port: int, host: str = "127.0.0.1") -> bool:
    """Whether a SuperNode's own API answers /health."""
    return http_ok(f"http://{host}:{port}/health")
