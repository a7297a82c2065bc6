"""The coordinator's Flower SuperLink: start it, submit runs with `flwr run`, read their status."""

from __future__ import annotations

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


class SuperLink:
    """One SuperLink process with persistent state under `flower_dir`."""

    def __init__(self, *, flower_dir: Path, port: int, group: ProcessGroup, host: str = "127.0.0.1") -> None:
        self.flower_dir = flower_dir.absolute()
        self.host, self.port = host, port
        self.group = group
        self.name = "superlink"

    @property
    def address(self) -> str:
        """host:port for SuperNodes and the CLI."""
        return f"{self.host}:{self.port}"

    def start(self, *, timeout: float = 60) -> float:
        """Start insecure on loopback (TLS comes with enrolment) and wait for /health."""
        self.flower_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
               "--database", str(self.flower_dir / "superlink-state.db"),
               "--host", self.host, "--port", str(self.port)]
        self.group.start(self.name, cmd, env=flower_env(self.flower_dir / "superlink-home"), cwd=self.flower_dir)
        return self.group.wait_for(lambda: http_ok(f"http://{self.address}/health"), "the SuperLink to answer /health",
                                   timeout=timeout, watch=(self.name,))

    def _cli_env(self) -> dict[str, str]:
        home = self.flower_dir / "cli-home"
        env = flower_env(home)
        (home / "config.toml").write_text(tomli_w.dumps(
            {"superlink": {"default": CONNECTION, CONNECTION: {"address": self.address, "insecure": True}}}))
        return env

    def _flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self._cli_env(), capture_output=True, text=True,
                              timeout=timeout, cwd=self.flower_dir, start_new_session=True)

    def submit(self, *, run_config: dict, timeout: float, on_poll: Callable[[], None] | None = None) -> RunOutcome:
        """Run the app to the end (`flwr run --stream`) and return the SuperLink's verdict.

        `flwr run --stream` exits 0 even when the ServerApp fails, so the status is read back.
        """
        cfg_path = self.flower_dir / "run-config.toml"
        cfg_path.write_text(tomli_w.dumps(run_config))
        cmd = ["flwr", "run", str(app_dir()), CONNECTION, "--stream", "--run-config", str(cfg_path)]
        self.group.start("flwr-run", cmd, env=self._cli_env(), cwd=self.flower_dir)
        def finished() -> bool:
            if on_poll is not None:
                on_poll()
            return self.group.procs["flwr-run"].poll() is not None

        self.group.wait_for(finished, "the federated run to finish", timeout=timeout,
                            watch=tuple(n for n in self.group.procs if n != "flwr-run"))
        log = (self.group.log_dir / "flwr-run.log").read_text(errors="replace")
        m = re.search(r"Successfully started run (\d+)", log)
        if not m:
            raise RuntimeError(f"flwr run did not start a run: {self.group.log_tail('flwr-run')}")
        run_id = m.group(1)
        ls = self._flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json")
        try:
            run = json.loads(ls.stdout)["runs"][0]
        except (json.JSONDecodeError, KeyError, IndexError):
            return RunOutcome(run_id, "unknown", ls.stdout[-500:] + ls.stderr[-500:])
        return RunOutcome(run_id, str(run.get("status")), str(run.get("status-details", "")))
