"""A study's Flower federation on this host: the coordinator's SuperLink and one node per site.

Deployment engine: a TLS SuperLink with SuperNode authentication (study CA and keys from
`evoclone pki` functions, kept under `<study>/pki`), one guarded SuperNode process per
site, each site approving the app bundle by its hash. Simulation engine: a SuperLink in
Flower's simulation runtime, whose virtual nodes read the sites' node configs through a
simulation index. Either way the same ServerApp and ClientApp run.

`train` supervises a run: if the SuperLink process dies it is restarted on its persistent
state and the run is resubmitted with the same run key, so it continues from the last
completed round (the ServerApp's checkpoint) and no site is charged twice for a round.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from evoclone.coordinator.superlink import LinkSecurity, SuperLink, SuperLinkDied, fab_hash
from evoclone.federated.flower.runtime import ProcessGroup, free_port
from evoclone.site_node.approvals import ApprovalStore
from evoclone.site_node.supernode import NodeSecurity, start_supernode, supernode_healthy, write_node_config

MAX_RESTARTS = 3


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure_pki(pki_dir: Path, site_names: list[str]) -> tuple[LinkSecurity, dict[str, tuple[Path, Path]]]:
    """The study CA, the SuperLink certificate (localhost / 127.0.0.1 / ::1) and one key pair per site.

    Existing material is reused after checking it: an expired or foreign certificate is an
    error before anything starts (re-issue it with `evoclone pki`).
    """
    from evoclone.privacy.pki import PKIError, issue_server, new_ca, new_node_keypair, verify_server_cert

    pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key, ca_pem = pki_dir / "ca.key", pki_dir / "ca.pem"
    if not ca_pem.is_file():
        key, cert = new_ca("EvoClone study CA")
        _write_private(ca_key, key)
        ca_pem.write_bytes(cert)
    link_key, link_pem = pki_dir / "superlink.key", pki_dir / "superlink.pem"
    if not link_pem.is_file():
        key, cert = issue_server(ca_key.read_bytes(), ca_pem.read_bytes(), "superlink",
                                 dns=["localhost"], ips=["127.0.0.1", "::1"])
        _write_private(link_key, key)
        link_pem.write_bytes(cert)
    try:
        verify_server_cert(link_pem.read_bytes(), ca_pem.read_bytes(), host="127.0.0.1")
    except PKIError as exc:
        raise ValueError(f"{link_pem}: {exc}") from None
    nodes = {}
    for name in site_names:
        priv, pub = pki_dir / f"{name}.node.key", pki_dir / f"{name}.node.pub"
        if not pub.is_file():
            key, public = new_node_keypair(comment=name)
            _write_private(priv, key)
            pub.write_bytes(public)
        nodes[name] = (priv, pub)
    return LinkSecurity(ca_cert=ca_pem, cert=link_pem, key=link_key), nodes


class Federation:
    """Start, supervise and stop a study's Flower processes (a context manager)."""

    def __init__(self, study_dir: Path, parts: list, *, insecure: bool = False, engine: str = "deployment",
                 port: int = 0) -> None:
        self.study_dir = study_dir
        self.parts = parts
        self.insecure = insecure
        self.engine = engine
        self.port = port
        self.group = ProcessGroup(study_dir / "logs")
        self.link: SuperLink | None = None
        self.security: LinkSecurity | None = None
        self.node_keys: dict[str, tuple[Path, Path]] = {}
        self.node_ports: dict[str, int] = {}
        self.restarts = 0

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> "Federation":
        try:
            self.start()
        except BaseException:
            self.group.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.group.stop()

    def start(self) -> None:
        flower_dir = self.study_dir / "coordinator" / "flower"
        # a new federation starts from empty SuperLink state (nodes of an earlier invocation
        # are gone); the state persists across restarts within this one
        for f in flower_dir.glob("superlink-state.db*"):
            f.unlink()
        if self.engine == "simulation":
            index = self.study_dir / "coordinator" / "simulation-index.json"
            index.parent.mkdir(parents=True, exist_ok=True)
            index.write_text(json.dumps({"sites": [str(write_node_config(p.settings)) for p in self.parts]}))
            self.simulation_index = index
            self.link = SuperLink(flower_dir=flower_dir, port=self.port or free_port(), group=self.group,
                                  simulation=True)
            self.link.start()
            return
        if not self.insecure:
            self.security, self.node_keys = ensure_pki(self.study_dir / "pki", [p.name for p in self.parts])
        self.link = SuperLink(flower_dir=flower_dir, port=self.port or free_port(), group=self.group,
                              security=self.security)
        self.link.start()
        h = fab_hash()
        for p in self.parts:
            if self.security is not None:
                self.link.register_node(self.node_keys[p.name][1], name=p.name)
            store = ApprovalStore(url=p.settings.db_url)
            try:
                if not store.is_approved(h):
                    store.approve(h, admin="evoclone train (sponsor-operated site nodes)",
                                  note="approved by the study operator for this training")
            finally:
                store.close()
        for p in self.parts:
            self.start_node(p)
        for p in self.parts:
            self.wait_node(p)

    def start_node(self, part) -> str:
        """(Re)start one site's SuperNode."""
        port = self.node_ports.setdefault(part.name, free_port())
        sec = None if self.security is None else NodeSecurity(ca_cert=self.security.ca_cert,
                                                             node_key=self.node_keys[part.name][0])
        return start_supernode(part.settings, superlink=self.link.address, port=port, group=self.group, security=sec)

    def wait_node(self, part, timeout: float = 60) -> None:
        name = f"supernode-{part.name}"
        port = self.node_ports[part.name]
        self.group.wait_for(lambda: supernode_healthy(port=port), f"{name} to answer /health", timeout=timeout,
                            watch=(name,))

    def restart_link(self) -> None:
        """Start the SuperLink again on its persistent state (runs, registered nodes)."""
        self.restarts += 1
        self.link.start()

    # -- training -------------------------------------------------------------------------
    def train(self, rc: dict, coordinator_dir: Path, *, rounds: int, timeout: float = 24 * 3600,
              on_round: Callable[[int, int], None] | None = None) -> dict:
        """Run one model's training to the end (resuming after SuperLink restarts); returns its record."""
        rounds_file = coordinator_dir / "rounds.json"
        rc = dict(rc)
        fed_cfg = None
        if self.engine == "simulation":
            rc["simulation-index"] = str(self.simulation_index)
            # one CPU per virtual node: as many ClientApp actors run at once as the host has cores
            fed_cfg = {"num-supernodes": len(self.parts), "client-resources-num-cpus": 1}

        def show() -> None:
            if on_round is None or not rounds_file.is_file():
                return
            try:
                done = [r for r in json.loads(rounds_file.read_text())["rounds"]]
            except (json.JSONDecodeError, KeyError, OSError):
                return
            on_round(len(done), rounds)

        while True:
            try:
                outcome = self.link.submit(run_config=rc, timeout=timeout, on_poll=show, federation_config=fed_cfg)
                break
            except SuperLinkDied:
                if self.restarts >= MAX_RESTARTS:
                    raise RuntimeError(f"the SuperLink died {self.restarts + 1} times; see {self.group.log_dir}") from None
                self.restart_link()
        show()
        doc = json.loads(rounds_file.read_text()) if rounds_file.is_file() else {}
        if not outcome.ok or doc.get("status") != "completed":
            why = doc.get("error") or outcome.details[:300] or outcome.status
            raise RuntimeError(f"federated run {outcome.run_id} ended {outcome.status}: {why}; "
                               f"logs in {self.group.log_dir}")
        return {"coordinator": str(coordinator_dir), "run_key": doc["run_key"], "flower_runs": doc["flower_runs"],
                "prepare": doc.get("prepare"), "rounds": doc["rounds"], "best_round": doc.get("best_round"),
                "status": doc["status"],
                "note": doc.get("error", ""), "superlink_restarts": self.restarts}
