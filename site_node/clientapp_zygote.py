"""A warm process that starts the site's ClientApp processes with the heavy modules already imported.

Flower's SuperNode starts a new `flwr-clientapp` process for every message; importing
torch, Opacus and the models costs that process about four CPU-seconds, paid by every site
in every round. The guarded SuperNode (`flower_node`) therefore starts this zygote, which
imports them once and forks a ClientApp for each request, and puts a tiny
`flwr-clientapp` shim first on the SuperNode's PATH: the shim hands its arguments,
environment, working directory and standard streams to the zygote over a private Unix
socket (mode 0600 in a 0700 directory) and exits. A zygote still importing (the first
messages of a study reach a node that has just started) is waited for: a cold ClientApp would
import the same modules again on the same cores, slowing both. Without a zygote (gone, or
never started) the shim runs Flower's own `flwr-clientapp`, so nothing depends on it. This is
the forkserver technique (Python's multiprocessing, gunicorn's preload): the zygote runs no
torch computation, so nothing thread-related is forked. The zygote removes its directory when
it leaves, on SIGTERM too.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# Everything a ClientApp imports on its way through a query, train or evaluate message: a module missing here is
# imported again by every ClientApp of every round (dp_layers brings transformers; torch imports its compiler
# stack on a first optimizer step: about 500 modules and 1-2 CPU-seconds per process). A test runs a DP round
# after importing these and fails if the round imports anything heavy.
PRELOAD = ("torch", "opacus", "sqlite3", "statistics", "flwr.supernode.cli.flwr_clientapp",
           "torch._dynamo", "torch._inductor.config", "torch._numpy", "torch.onnx", "torch._functorch.make_functional",
           "torch.nn.utils._expanded_weights", "torch.profiler._cupti_monitor",
           "evoclone.federated.flower.client_app", "evoclone.federated.flower.tasks",
           "evoclone.federated.training", "evoclone.federated.predictor", "evoclone.federated.dp_layers",
           "evoclone.federated.evaluation", "evoclone.federated.metrics", "evoclone.federated.snapshot",
           "evoclone.federated.arm_shift", "evoclone.federated.stores.ledger", "evoclone.privacy.accounting",
           "safetensors.torch")
SOCKET_ENV = "EVOCLONE_CLIENTAPP_ZYGOTE"
REAL_ENV = "EVOCLONE_REAL_CLIENTAPP"
CHILD_ENV = "EVOCLONE_ZYGOTE_CHILD"  # set in every ClientApp forked from the zygote
WAIT_ENV = "EVOCLONE_ZYGOTE_WAIT"  # seconds a shim waits for a zygote that is still importing
WAIT_SECONDS = 120.0  # preloading takes seconds; this bounds a zygote that hangs while alive
PID_FILE = "zygote.pid"  # in the shim's directory: the zygote a shim may wait for

SHIM = '''#!{python} -S
# flwr-clientapp shim written by evoclone: fork the ClientApp from the site's warm zygote
import json, os, socket, struct, sys, time
real = os.environ.get("{real_env}", "")

def zygote_pid(sock):
    try:
        return int(open(os.path.join(os.path.dirname(sock), "{pid_file}")).read())
    except (OSError, ValueError):
        return None

def alive(pid):
    """The zygote still runs (a zombie has left)."""
    if pid is None:
        return False
    try:  # Linux: a zombie (exited, not yet reaped by the SuperNode) has left too
        return open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        if os.path.isdir("/proc"):
            return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True

try:
    sock = os.environ["{socket_env}"]
    deadline = time.monotonic() + float(os.environ.get("{wait_env}", "{wait}"))
    pid = zygote_pid(sock)
    while not os.path.exists(sock) and time.monotonic() < deadline and alive(pid):
        time.sleep(0.05)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    doc = json.dumps({{"argv": ["flwr-clientapp", *sys.argv[1:]], "env": dict(os.environ),
                      "cwd": os.getcwd()}}).encode()
    socket.send_fds(s, [struct.pack("!I", len(doc)) + doc], [0, 1, 2])
    if not s.recv(16):
        raise OSError("the zygote did not start the ClientApp")
except (OSError, KeyError):
    os.execv(real, [real, *sys.argv[1:]])
'''


def prepare(real_clientapp: str) -> tuple[Path, dict[str, str]]:
    """A private directory with the shim; returns (socket path, environment additions for the SuperNode)."""
    d = Path(tempfile.mkdtemp(prefix="evoclone-zyg-"))  # short path: Unix socket paths are limited to 107 bytes
    shim = d / "flwr-clientapp"
    shim.write_text(SHIM.format(python=sys.executable, real_env=REAL_ENV, socket_env=SOCKET_ENV, wait_env=WAIT_ENV,
                                wait=WAIT_SECONDS, pid_file=PID_FILE))
    shim.chmod(0o755)
    sock = d / "zygote.sock"
    env = {SOCKET_ENV: str(sock), REAL_ENV: real_clientapp,
           "PATH": f"{d}{os.pathsep}{os.environ.get('PATH', '')}"}
    return sock, env


def start(sock_path: Path, parent_pid: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the zygote for `prepare`'s socket, serving while `parent_pid` lives; shims wait for it from now on."""
    proc = subprocess.Popen([sys.executable, "-m", "evoclone.site_node.clientapp_zygote", str(sock_path),
                             str(parent_pid)], stdin=subprocess.DEVNULL, env=env)
    tmp = sock_path.parent / (PID_FILE + ".tmp")
    tmp.write_text(str(proc.pid))
    os.replace(tmp, sock_path.parent / PID_FILE)
    return proc


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    msg, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
    (size,) = struct.unpack("!I", msg[:4])
    body = msg[4:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise OSError("truncated request")
        body += chunk
    return json.loads(body), list(fds)


def _run_child(req: dict, fds: list[int]) -> None:
    """In the forked child: become the requested flwr-clientapp process."""
    code = 1
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        os.environ[CHILD_ENV] = "1"
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Flower's ClientApp leaves when its SuperNode (--parent-pid) dies by raising SIGINT in itself: a
        # zygote started with SIGINT ignored (a background job, say) would pass that on, and the ClientApp
        # would retry its dead SuperNode forever
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = list(req["argv"])
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        flwr_clientapp()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 (a child must always exit through os._exit)
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(sock_path: Path, parent_pid: int) -> None:
    """Preload, then fork a ClientApp per request while the SuperNode (parent) lives; leave no directory behind."""
    me = os.getpid()
    # a SuperNode stopped with its process group sends SIGTERM: leave through `finally`, which removes the
    # directory (its socket and the shim); forked children restore the default at once (`_run_child`)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    try:
        _serve(sock_path, parent_pid)
    finally:
        if os.getpid() == me:  # not in a child that a signal caught between the fork and `_run_child`
            import shutil

            shutil.rmtree(sock_path.parent, ignore_errors=True)


def _serve(sock_path: Path, parent_pid: int) -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    from evoclone.federated.api_common import freeze_startup_objects
    from evoclone.federated.flower.backoff import apply_backoffs

    apply_backoffs()
    # the children inherit these objects for good: frozen, a child's first collections skip them instead of walking
    # (and copying on write) the whole preloaded heap, a pause of 0.3-0.5 s at the start of every round
    freeze_startup_objects()

    def reap(_signum, _frame) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    signal.signal(signal.SIGCHLD, reap)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    bound = sock_path.with_name(sock_path.name + ".tmp")
    try:
        srv.bind(str(bound))
    finally:
        os.umask(old)
    srv.listen(16)
    os.replace(bound, sock_path)  # appears listening: a shim that sees it can connect
    srv.settimeout(1.0)
    try:
        while os.getppid() == parent_pid:
            try:
                conn, _ = srv.accept()
            except (TimeoutError, InterruptedError):
                continue
            with conn:
                conn.settimeout(10.0)
                try:
                    req, fds = _recv_request(conn)
                except (OSError, ValueError):
                    continue
                pid = os.fork()
                if pid == 0:
                    srv.close()
                    _run_child(req, fds)
                for fd in fds:
                    os.close(fd)
                try:
                    conn.sendall(str(pid).encode())
                except OSError:
                    pass
    finally:
        srv.close()


if __name__ == "__main__":
    from evoclone.site_node.clientapp_zygote import serve as serve_zygote  # the package's module, not __main__

    serve_zygote(Path(sys.argv[1]), int(sys.argv[2]))
