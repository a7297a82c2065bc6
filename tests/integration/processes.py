"""Processes the integration tests run beside pytest: one command in the background, several at once."""

from __future__ import annotations

import subprocess
from pathlib import Path


class Background:
    """A command running in the background with stdout and stderr in files; `result` waits for it like
    subprocess.run(capture_output=True, text=True, timeout=...) and returns its CompletedProcess."""

    def __init__(self, cmd: list[str], log_dir: Path) -> None:
        self.out, self.err = log_dir / "stdout", log_dir / "stderr"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def result(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out.read_text(),
                                           self.err.read_text())

    def stop(self) -> None:
        """SIGTERM (`evoclone train` then stops every Flower process it started), SIGKILL if that hangs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Concurrent:
    """Subprocesses started together; `result` gives subprocess.run's CompletedProcess (same 120 s limit)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def result(self, proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
        self.procs.remove(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def kill(self) -> None:
        """Stop and reap whatever was not collected (a check failed before its turn)."""
        for proc in self.procs:
            proc.kill()
            proc.communicate()
        self.procs.clear()
