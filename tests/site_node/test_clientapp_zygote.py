"""The warm ClientApp zygote: the shim hands a ClientApp start to it, or falls back to Flower's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from evoclone.site_node.clientapp_zygote import REAL_ENV, SOCKET_ENV, prepare


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}


def test_shim_falls_back_to_flowers_clientapp_without_a_zygote():
    real = shutil.which("flwr-clientapp", path=os.path.dirname(sys.executable))
    sock, env = prepare(real)
    try:
        shim = sock.parent / "flwr-clientapp"
        r = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=120, env=_env(env))
        assert r.returncode == 0 and "usage: flwr-clientapp" in r.stdout
    finally:
        shutil.rmtree(sock.parent, ignore_errors=True)


def test_shim_forks_the_clientapp_from_the_warm_zygote():
    real = shutil.which("flwr-clientapp", path=os.path.dirname(sys.executable))
    sock, env = prepare(real)
    zygote = subprocess.Popen([sys.executable, "-m", "evoclone.site_node.clientapp_zygote", str(sock),
                               str(os.getpid())], env=_env(env))
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():  # the zygote binds its socket once the heavy imports are done
            assert zygote.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        shim = sock.parent / "flwr-clientapp"
        # the forked ClientApp writes to the shim's own stdout; a broken real binary proves no fallback ran
        r = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=60,
                           env=_env({**env, REAL_ENV: "/nonexistent/flwr-clientapp"}))
        assert "usage: flwr-clientapp" in r.stdout, r.stderr[-500:]
    finally:
        zygote.terminate()
        zygote.wait(timeout=30)
        shutil.rmtree(sock.parent, ignore_errors=True)
    assert SOCKET_ENV in env
