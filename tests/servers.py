"""Real servers for store tests, started on free loopback ports (never sleeps: polls readiness)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from evoclone.federated.flower.runtime import free_port


def _wait(ready, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not become ready")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def mongo_server(tmp: Path):
    """Real `mongod` when installed, else the nx-27017 wire-protocol server from PyPI."""
    from pymongo import MongoClient

    port = free_port()
    if shutil.which("mongod"):
        (tmp / "mongo").mkdir()
        cmd = ["mongod", "--bind_ip", "127.0.0.1", "--port", str(port), "--dbpath", str(tmp / "mongo"), "--quiet"]
    else:
        cmd = [str(Path(sys.executable).parent / "nx-27017"), "--host", "127.0.0.1", "-p", str(port),
               "--data-dir", str(tmp / "nx"), "--log-file", str(tmp / "nx.log"), "--pid-file", str(tmp / "nx.pid")]
        (tmp / "nx").mkdir()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"mongodb://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with MongoClient(url, serverSelectionTimeoutMS=200) as c:
                c.admin.command("ping")
            return True
        except Exception:  # noqa: BLE001 (any connection failure means "not yet")
            return False

    try:
        _wait(ready, proc, "MongoDB wire server")
        yield url
    finally:
        _stop(proc)


@contextmanager
def s3_server():
    """Real MinIO when installed, else moto's standalone S3 server from PyPI."""
    import urllib.request

    port = free_port()
    cmd = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.5):  # noqa: S310
                return True
        except OSError:
            return False

    try:
        _wait(ready, proc, "S3 server")
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)
