"""The warm ClientApp zygote: the shim hands a ClientApp start to it, or falls back to Flower's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from evoclone.site_node.clientapp_zygote import PID_FILE, REAL_ENV, SOCKET_ENV, WAIT_ENV, prepare, start


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


def test_shim_waits_for_a_starting_zygote_and_forks_the_clientapp_from_it():
    real = shutil.which("flwr-clientapp", path=os.path.dirname(sys.executable))
    sock, env = prepare(real)
    zygote = start(sock, os.getpid(), env=_env(env))
    try:
        shim = sock.parent / "flwr-clientapp"
        # asked while the zygote still imports (it binds its socket once the heavy imports are done): the shim
        # waits for it; the forked ClientApp writes to the shim's own stdout, and a broken real binary proves
        # that no fallback ran
        assert not sock.exists()
        r = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=180,
                           env=_env({**env, REAL_ENV: "/nonexistent/flwr-clientapp"}))
        assert "usage: flwr-clientapp" in r.stdout, r.stderr[-500:]
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        # a SuperNode is stopped with its process group (SIGTERM): the zygote takes its directory with it
        zygote.terminate()
        assert zygote.wait(timeout=30) == 0
        assert not sock.parent.exists()
    finally:
        zygote.kill()
        zygote.wait(timeout=30)
        shutil.rmtree(sock.parent, ignore_errors=True)
    assert SOCKET_ENV in env


def test_shim_falls_back_at_once_when_the_zygote_died_while_starting():
    real = shutil.which("flwr-clientapp", path=os.path.dirname(sys.executable))
    sock, env = prepare(real)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exited, never reaped: /proc still lists it
    try:
        for pid in (gone.pid, zombie.pid):
            (sock.parent / PID_FILE).write_text(str(pid))
            # were the shim to wait for a zygote that is no more, the wait (10 minutes) would outlast the timeout
            r = subprocess.run([str(sock.parent / "flwr-clientapp"), "--help"], capture_output=True, text=True,
                               timeout=120, env=_env({**env, WAIT_ENV: "600"}))
            assert r.returncode == 0 and "usage: flwr-clientapp" in r.stdout
    finally:
        zombie.wait()
        shutil.rmtree(sock.parent, ignore_errors=True)


def _children(parent: int) -> list[int]:
    """Live children of `parent` (a forked ClientApp keeps the zygote's command line, so find it by its parent)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and fields[0] != "Z":
                out.append(int(d.name))
    return out


def test_a_forked_clientapp_leaves_when_its_supernode_dies_even_if_the_zygote_ignores_sigint():
    import signal
    import uuid

    real = shutil.which("flwr-clientapp", path=os.path.dirname(sys.executable))
    sock, env = prepare(real)
    zygote = subprocess.Popen([sys.executable, "-m", "evoclone.site_node.clientapp_zygote", str(sock),
                               str(os.getpid())], env=_env(env),
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    supernode = subprocess.Popen(["sleep", "600"])  # stands in for the SuperNode the ClientApp watches
    token = f"t-{uuid.uuid4().hex}"
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert zygote.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        # a ClientApp whose SuperNode API never answers: it retries until its parent goes
        subprocess.run([str(sock.parent / "flwr-clientapp"), "--runtime-api-address", "127.0.0.1:9",
                        "--insecure", "--token", token, "--parent-pid", str(supernode.pid)],
                       env=_env({**env, REAL_ENV: "/nonexistent/flwr-clientapp"}), timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not _children(zygote.pid):
            assert time.monotonic() < deadline, "the zygote did not start the ClientApp"
            time.sleep(0.1)
        supernode.kill()
        supernode.wait()
        deadline = time.monotonic() + 15
        while _children(zygote.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _children(zygote.pid), "the ClientApp outlived its SuperNode"
    finally:
        for pid in _children(zygote.pid):
            os.kill(pid, signal.SIGKILL)
        supernode.kill()
        zygote.terminate()
        zygote.wait(timeout=30)
        shutil.rmtree(sock.parent, ignore_errors=True)


CHILD = r'''
import importlib, json, sys
from pathlib import Path
from evoclone.site_node.clientapp_zygote import PRELOAD
for name in PRELOAD:
    importlib.import_module(name)
before = set(sys.modules)
spec = json.loads(Path(sys.argv[1]).read_text())
from flwr.app import Context, RecordDict
from evoclone.federated.flower.client_app import _round
from evoclone.federated.flower.tasks import task_for
from evoclone.federated.stores.ledger import SqlLedgerStore
node = {**spec["node"], "snapshot": Path(spec["node"]["snapshot"]), "state_dir": Path(spec["node"]["state_dir"])}
ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=spec["rc"])
store = SqlLedgerStore(url=node["ledger"])
result = _round(spec["cfg"], lambda: task_for(spec["rc"]).initial_state(spec["vocab"]), ctx, node, store)
assert result.ok, result.reason
print(json.dumps(sorted(set(sys.modules) - before)))
'''


def test_a_dp_training_round_imports_nothing_the_zygote_did_not_preload(tmp_path):
    """What a round imports after the fork, every ClientApp of every round imports again (transformers with
    torch._dynamo cost 1-2 CPU-seconds): the zygote's PRELOAD must cover a round's whole path."""
    import json
    import tomllib

    from evoclone.federated.flower.tasks import FusionTask
    from evoclone.federated.simulator import cohort_records, simulate_cohort
    from evoclone.federated.snapshot import write_snapshot
    from evoclone.federated.summaries import summarize

    records = cohort_records(simulate_cohort(patients=120, sites=1, seed=3))
    write_snapshot(tmp_path / "snapshot.jsonl.gz", records, site="s1")
    app = Path(__file__).resolve().parents[2] / "federated" / "flower" / "app" / "pyproject.toml"
    rc = {**tomllib.loads(app.read_text())["tool"]["flwr"]["app"]["config"], "local-epochs": 1, "batch-size": 16,
          "run-key": "preload"}
    vocab = FusionTask(rc).vocabulary(summarize(records, history_days=730.0, min_count=10, coarse=True))
    spec = {"rc": rc, "vocab": vocab, "cfg": {"server-round": 1, "vocabulary": json.dumps(vocab), "planned-rounds": 2},
            "node": {"site": "s1", "snapshot": str(tmp_path / "snapshot.jsonl.gz"), "budget": 10.0, "delta": 1e-5,
                     "ledger": f"sqlite:///{tmp_path / 'site.db'}", "state_dir": str(tmp_path),
                     "feedback": str(tmp_path / "feedback.jsonl")}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "spec.json")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    imported = json.loads(r.stdout.strip().splitlines()[-1])
    heavy = [m for m in imported if m.split(".")[0] in ("transformers", "scipy", "pandas", "sklearn", "lifelines",
                                                        "PIL", "jinja2", "sqlalchemy") or m.startswith("torch.")]
    assert not heavy, f"a training round imported {len(imported)} modules after the fork, e.g. {heavy[:10]}"
