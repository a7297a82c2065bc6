"""What the ServerApp and ClientApp share: reply statuses, the run key, the site's node settings."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from flwr.app import Context

from ..feedback import feedback_path

STATUS_OK = "ok"
STATUS_REFUSED = "refused"
NODE_KEYS = ("site-name", "snapshot", "ledger", "epsilon-budget", "delta")


def run_key(context: Context) -> str:
    """The study run's stable key: the run config's `run-key`, else Flower's run id.

    `evoclone train` sets it so a run resubmitted after a SuperLink restart keeps its
    privacy plan, its charges and its kept updates.
    """
    return str(context.run_config.get("run-key", "")) or str(context.run_id)


def node_settings(context: Context) -> dict:
    """The site's settings: the SuperNode's node config, or in simulation the index entry of its partition."""
    nc = dict(context.node_config)
    if "site-name" not in nc and "partition-id" in nc:
        index = str(context.run_config.get("simulation-index", ""))
        if not index:
            raise ValueError("simulated node without a site: the run config needs simulation-index")
        sites = json.loads(Path(index).read_text())["sites"]
        pid = int(nc["partition-id"])
        if pid >= len(sites):
            raise ValueError(f"simulated partition {pid} has no site in {index} ({len(sites)} sites)")
        nc = tomllib.loads(Path(sites[pid]).read_text())
    missing = [k for k in NODE_KEYS if k not in nc]
    if missing:
        raise ValueError(f"SuperNode started without node config {missing}; start it with `evoclone site node`")
    snapshot = Path(str(nc["snapshot"]))
    return {"site": str(nc["site-name"]), "snapshot": snapshot, "ledger": str(nc["ledger"]),
            "budget": float(nc["epsilon-budget"]), "delta": float(nc["delta"]),
            "state_dir": Path(str(nc.get("state-dir", snapshot.parent))),
            "feedback": Path(str(nc["feedback"])) if nc.get("feedback") else feedback_path(snapshot)}
