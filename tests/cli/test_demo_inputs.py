"""Bad demo input: one-line error, exit code 2, nothing written."""

import socket

import pytest
from typer.testing import CliRunner

from evoclone.cli.main import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["demo", *args])


@pytest.mark.parametrize("args, needle", [
    (["--sites", "0"], "--sites"),
    (["--rounds", "0"], "--rounds"),
    (["--epsilon", "0"], "--epsilon"),
    (["--epsilon", "-1"], "--epsilon"),
    (["--patients", "10"], "--patients"),
])
def test_bad_numbers_exit_2_and_write_nothing(tmp_path, args, needle):
    out = tmp_path / "demo"
    result = _run("--out", str(out), *args)
    assert result.exit_code == 2
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_non_empty_out_needs_force_and_force_never_deletes_foreign_files(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = _run("--out", str(out))
    assert result.exit_code == 2 and "--force" in result.stderr
    result = _run("--out", str(out), "--force")
    assert result.exit_code == 2 and "refusing" in result.stderr
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_unwritable_out(tmp_path):
    result = _run("--out", "/proc/evoclone-demo")
    assert result.exit_code == 2 and "not writable" in result.stderr
    f = tmp_path / "file"
    f.write_text("x")
    result = _run("--out", str(f))
    assert result.exit_code == 2 and "not a directory" in result.stderr


def test_port_already_taken(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = _run("--out", str(tmp_path / "demo"), "--port", str(port))
    assert result.exit_code == 2 and f"port {port}" in result.stderr and "in use" in result.stderr
    assert not (tmp_path / "demo").exists()


def test_help_lists_commands_with_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.stdout and "data" in result.stdout
    assert "Example:" in runner.invoke(app, ["demo", "--help"]).stdout
    assert "Example:" in runner.invoke(app, ["data", "simulate", "--help"]).stdout


def test_data_simulate_writes_extracts(tmp_path):
    import json

    result = runner.invoke(app, ["data", "simulate", "--patients", "60", "--sites", "2", "--seed", "3",
                                 "--out", str(tmp_path / "c"), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [s["patients"] for s in doc["sites"]] == [30, 30]
    assert (tmp_path / "c" / "site-2" / "events.csv").is_file() and (tmp_path / "c" / "ground_truth.json").is_file()
    bad = runner.invoke(app, ["data", "simulate", "--sites", "0", "--out", str(tmp_path / "d")])
    assert bad.exit_code == 2 and not (tmp_path / "d").exists()
