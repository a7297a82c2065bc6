"""Start, watch and stop Flower processes (SuperLink, SuperNodes, `flwr run`) on this host.

Each process runs in its own session; Flower's helpers (`flower-superexec`,
`flwr-serverapp`, `flwr-clientapp`) may start sessions of their own, so shutdown
signals every process group ever seen among the descendants, then reaps them.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path


class PortInUseError(RuntimeError):
    """A port the caller asked for is already bound by another program."""


def bin_dir() -> Path:
    """The environment's `bin/`, where Flower's helper executables live."""
    return Path(sys.executable).parent


def flower_env(home: Path) -> dict[str, str]:
    """Environment for a Flower process: helpers on PATH, config and state under `home`."""
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env.update(FLWR_HOME=str(home), PYTHONUNBUFFERED="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1")
    home.mkdir(parents=True, exist_ok=True)
    return env


_LOWEST_PICKED_PORT = 10000  # below it lie the well-known services (PostgreSQL, Redis, Flower's defaults...)
_pick = random.SystemRandom()  # not the `random` module's state: a seeded caller would pick the same ports


def _ephemeral_ports(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> range:
    """The ports the kernel hands out to outgoing connections and to bind(port 0)."""
    try:
        low, high = (int(v) for v in path.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port(host: str = "127.0.0.1", *, block: int = 1) -> int:
    """A port that is free now and that no outgoing connection will take before a server binds it.

    A port the kernel assigns (bind to port 0) lies in its ephemeral range, from
    which every outgoing connection on the host also takes its local port: between
    this call and the server's bind, a client connection (a database, a gRPC
    channel) can take it, and the server then fails to start. Ports are therefore
    drawn at random from outside that range and checked bindable. With `block`,
    the returned port and the `block - 1` after it are all free.
    """
    ephemeral = _ephemeral_ports()
    below, above = range(_LOWEST_PICKED_PORT, ephemeral.start - block + 1), range(ephemeral.stop, 65537 - block)
    starts = len(below) + len(above)
    for _ in range(200 if starts else 0):
        i = _pick.randrange(starts)
        base = below[i] if i < len(below) else above[i - len(below)]
        if all(port_is_free(p, host) for p in range(base, base + block)):
            return base
    if not starts and block == 1:  # the ephemeral range covers every port here: take the kernel's pick
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    raise PortInUseError(f"found no {block} free consecutive port(s) on {host} outside the kernel's ephemeral "
                         f"range {ephemeral.start}-{ephemeral.stop - 1}; stop some servers or widen that range")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind `host:port` now (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def require_free(ports: list[int], host: str = "127.0.0.1") -> None:
    """Raise PortInUseError naming the first taken port."""
    for p in ports:
        if not port_is_free(p, host):
            raise PortInUseError(f"port {p} on {host} is already in use by another program; "
                                 f"choose another with --port or stop that program")


def http_ok(url: str, *, cafile: Path | str | None = None) -> bool:
    """True when GET `url` answers 200 (https verified against `cafile` when given)."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    try:
        with urllib.request.urlopen(url, timeout=1, context=ctx) as r:  # noqa: S310 (loopback health checks)
            return r.status == 200
    except OSError:
        return False


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", encoding="utf-8") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ProcessGroup:
    """Processes started together and stopped together, with their whole descendant trees."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: set[int] = set()
        self._logs: list = []

    def start(self, name: str, cmd: list[str], *, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        """Start `cmd` in its own session, logging to `<log_dir>/<name>.log`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop())
        self._logs.append(log)
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        self.track()
        return proc

    def track(self) -> None:
        """Remember every current descendant (short-lived helpers included)."""
        kids = _children()
        stack = [p.pid for p in self.procs.values()]
        self.seen.update(stack)
        while stack:
            for c in kids.get(stack.pop(), []):
                if c not in self.seen:
                    self.seen.add(c)
                    stack.append(c)

    def check_alive(self, *names: str) -> None:
        """Raise RuntimeError with the log tail if a named process has exited."""
        for name in names or tuple(self.procs):
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}: {self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 5) -> str:
        """Last lines of a process's log, for error messages."""
        path = self.log_dir / f"{name}.log"
        if not path.is_file():
            return ""
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])

    def wait_for(self, predicate: Callable[[], bool], what: str, *, timeout: float, watch: tuple[str, ...] = ()) -> float:
        """Poll `predicate` with backoff until true; fail fast if a watched process dies."""
        t0 = time.monotonic()
        delay = 0.05
        while not predicate():
            self.track()
            self.check_alive(*watch)
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        return time.monotonic() - t0

    def stop(self, grace: float = 5.0) -> list[int]:
        """SIGTERM every process group seen, SIGKILL what survives; returns survivors (normally none)."""
        self.track()
        groups = set()
        for pid in self.seen:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        groups.discard(os.getpgid(0))  # never signal our own group
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for g in groups:
                try:
                    os.killpg(g, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                for p in self.procs.values():
                    p.poll()
                if not any(_alive(pid) for pid in self.seen):
                    break
                time.sleep(0.05)
            if not any(_alive(pid) for pid in self.seen):
                break
        for p in self.procs.values():
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        for f in self._logs:
            f.close()
        self._logs.clear()
        return sorted(pid for pid in self.seen if _alive(pid))
