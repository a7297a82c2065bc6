"""The coordinator's Flower SuperLink: start it, submit runs with `flwr run`, read their status."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import tomli_w

from evoclone.federated.flower.runtime import ProcessGroup, flower_env, http_ok

CONNECTION = "evoclone"


def app_dir() -> Path:
    """The Flower App folder submitted by `flwr run` (configuration only; code is installed)."""
    return Path(str(files("evoclone.federated.flower") / "app"))


def fab_hash(app: Path | None = None) -> str:
    """sha256 of the Flower App bundle `flwr run` builds from the app folder (what sites approve)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app or app_dir())).hexdigest()


@dataclass(frozen=True)
class LinkSecurity:
    """The SuperLink's TLS certificate, key and the study CA (None on a SuperLink: --insecure)."""

    ca_cert: Path
    cert: Path
    key: Path

    def check(self) -> None:
        """Clear errors for missing files before a process is started."""
        for what, p in (("CA certificate", self.ca_cert), ("SuperLink certificate", self.cert),
                        ("SuperLink private key", self.key)):
            if not Path(p).is_file():
                raise FileNotFoundError(f"{what} {p} does not exist; create it with `evoclone pki`")


@dataclass(frozen=True)
class RunOutcome:
    """How a submitted run ended, per the SuperLink."""

    run_id: str
    status: str
    details: str

    @property
    def ok(self) -> bool:
        """True when the ServerApp completed."""
        return self.status == "finished:completed"


class SuperLinkDied(RuntimeError):
    """The SuperLink process exited while a run was going on."""


class SuperLink:
    """One SuperLink process with persistent state under `flower_dir`."""

    def __init__(self, *, flower_dir: Path, port: int, group: ProcessGroup, host: str = "127.0.0.1",
                 security: LinkSecurity | None = None, simulation: bool = False,
                 database: Path | None = None) -> None:
        self.flower_dir = flower_dir.absolute()
        self.database = Path(database).absolute() if database else self.flower_dir / "superlink-state.db"
        self.host, self.port = host, port
        self.group = group
        self.security = security
        self.simulation = simulation
        self.name = "superlink"
        self.submissions = 0

    @property
    def address(self) -> str:
        """host:port for SuperNodes and the CLI on this host (loopback when it listens on every interface)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{'https' if self.security else 'http'}://{self.address}/health"

    def healthy(self) -> bool:
        """Whether the SuperLink answers /health (over TLS, verified against the CA, when secure)."""
        return http_ok(self.health_url, cafile=self.security.ca_cert if self.security else None)

    def start(self, *, timeout: float = 60) -> float:
        """Start (TLS and SuperNode authentication unless insecure) and wait for /health.

        State persists in `superlink-state.db`, so a restarted SuperLink keeps its runs and
        registered SuperNodes.
        """
        self.flower_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["flower-superlink", "--disable-runtime-dependency-installation",
               "--database", str(self.database),
               "--host", self.host, "--port", str(self.port)]
        if self.simulation:  # Flower's simulation runtime: virtual SuperNodes inside the SuperLink's host
            cmd.append("--simulation")
        if self.security is None:
            cmd.append("--insecure")
        else:
            self.security.check()
            cmd += ["--ssl-ca-certfile", str(Path(self.security.ca_cert).resolve()),
                    "--ssl-certfile", str(Path(self.security.cert).resolve()),
                    "--ssl-keyfile", str(Path(self.security.key).resolve()), "--enable-supernode-auth"]
        self.group.start(self.name, cmd, env=flower_env(self.flower_dir / "superlink-home"), cwd=self.flower_dir)
        return self.group.wait_for(self.healthy, "the SuperLink to answer /health", timeout=timeout,
                                   watch=(self.name,))

    def register_node(self, public_key: Path, *, name: str) -> None:
        """Register a SuperNode's public key (SuperNode authentication); idempotent."""
        r = self._flwr("supernode", "register", str(Path(public_key).resolve()), CONNECTION, "--name", name,
                       "--format", "json")
        if r.returncode != 0 and "already" not in (r.stdout + r.stderr).lower():
            raise RuntimeError(f"registering {name}'s SuperNode key failed: {(r.stdout + r.stderr).strip()[-300:]}")

    def register_node_id(self, public_key: Path, *, name: str) -> str | None:
        """Register a SuperNode's public key and return the node id the SuperLink gave it (None if already known)."""
        r = self._flwr("supernode", "register", str(Path(public_key).resolve()), CONNECTION, "--name", name,
                       "--format", "json")
        out = r.stdout + r.stderr
        if r.returncode != 0:
            if "already" in out.lower():
                return None
            raise RuntimeError(f"registering {name}'s SuperNode key failed: {out.strip()[-300:]}")
        m = re.search(r'"node-id":\s*"?(\d+)', out) or re.search(r"SuperNode (\d+) registered", out)
        return m.group(1) if m else None

    def unregister_node(self, node_id: str) -> None:
        """Withdraw a registered SuperNode (a revoked site); its connections are refused from now on."""
        r = self._flwr("supernode", "unregister", str(int(node_id)), CONNECTION, "--format", "json")
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0 and "not found" not in out.lower() and "unregistered" not in out.lower():
            raise RuntimeError(f"unregistering SuperNode {node_id} failed: {out[-300:]}")

    def nodes(self) -> list[dict]:
        """The SuperNodes the SuperLink knows (`flwr supernode list`): node-id, owner, status (registered,
        online, offline, unregistered), ..."""
        r = self._flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            return list(json.loads(r.stdout)["nodes"])
        except (ValueError, KeyError):
            raise RuntimeError(f"listing SuperNodes failed: {(r.stdout + r.stderr).strip()[-300:]}") from None

    def stop_run(self, run_id: str) -> None:
        """Ask the SuperLink to stop a run."""
        self._flwr("stop", run_id, CONNECTION)

    def _cli_env(self) -> dict[str, str]:
        home = self.flower_dir / "cli-home"
        env = flower_env(home)
        conn = {"address": self.address, "insecure": True} if self.security is None else \
            {"address": self.address, "root-certificates": str(Path(self.security.ca_cert).resolve())}
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))
        return env

    def _flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self._cli_env(), capture_output=True, text=True,
                              timeout=timeout, cwd=self.flower_dir, start_new_session=True)

    def submit(self, *, run_config: dict, timeout: float, on_poll: Callable[[], None] | None = None,
               federation_config: dict | None = None) -> RunOutcome:
        """Run the app to the end (`flwr run --stream`) and return the SuperLink's verdict.

        `flwr run --stream` exits 0 even when the ServerApp fails, so the status is read back.
        Raises SuperLinkDied when the SuperLink process exits meanwhile (the caller may
        restart it and resubmit: runs resume from their checkpoint).
        """
        cfg_path = self.flower_dir / "run-config.toml"
        cfg_path.write_text(tomli_w.dumps(run_config))
        cmd = ["flwr", "run", str(app_dir()), CONNECTION, "--stream", "--run-config", str(cfg_path)]
        if federation_config:
            cmd += ["--federation-config", " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config.items())]
        self.submissions += 1
        name = f"flwr-run-{self.submissions}"
        self.group.start(name, cmd, env=self._cli_env(), cwd=self.flower_dir)

        def finished() -> bool:
            if on_poll is not None:
                on_poll()
            return self.group.procs[name].poll() is not None

        try:
            self.group.wait_for(finished, "the federated run to finish", timeout=timeout, watch=(self.name,))
        except RuntimeError as exc:
            if self.group.procs[self.name].poll() is not None:
                raise SuperLinkDied(str(exc)) from None
            raise
        if self.group.procs[self.name].poll() is not None:
            raise SuperLinkDied(f"the SuperLink exited during the run: {self.group.log_tail(self.name)}")
        log = (self.group.log_dir / f"{name}.log").read_text(errors="replace")
        m = re.findall(r"Successfully started run (\d+)", log)
        if not m:
            raise RuntimeError(f"flwr run did not start a run: {self.group.log_tail(name)}")
        run_id = m[-1]
        ls = self._flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json")
        try:
            run = json.loads(ls.stdout)["runs"][0]
        except (json.JSONDecodeError, KeyError, IndexError):
            return RunOutcome(run_id, "unknown", ls.stdout[-500:] + ls.stderr[-500:])
        return RunOutcome(run_id, str(run.get("status")), str(run.get("status-details", "")))
