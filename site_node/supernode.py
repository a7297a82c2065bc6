"""The site's Flower SuperNode: the only process that lets the federation reach site data.

The ClientApp it runs reads the site's anonymized snapshot and privacy ledger paths from
the node config written here; the SuperLink never learns them.
"""

from __future__ import annotations

from pathlib import Path

import tomli_w

from evoclone.federated.flower.runtime import ProcessGroup, flower_env, http_ok

from .settings import SiteSettings


def write_node_config(settings: SiteSettings) -> Path:
    """Write the node config (TOML) the ClientApp reads; returns its path."""
    path = (settings.site_dir / "node-config.toml").absolute()
    path.write_text(tomli_w.dumps({
        "site-name": settings.name,
        "snapshot": str(settings.snapshot_path.resolve()),
        "ledger": str(settings.ledger_path.resolve()),
        "epsilon-budget": settings.epsilon_budget,
        "delta": settings.delta,
    }))
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
