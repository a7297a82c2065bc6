import json
import stat

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from evoclone.cli.main import app
from evoclone.privacy.pki import new_ca, verify_server_cert

runner = CliRunner()


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_init_issue_show(tmp_path):
    pki = tmp_path / "pki"
    r = runner.invoke(app, ["pki", "init", "--dir", str(pki), "--name", "Test CA", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["subject"].endswith("CN=Test CA") and doc["ca_key"] == str(pki / "ca.key")
    assert _mode(pki / "ca.key") == 0o600 and (pki / "ca.pem").is_file()
    assert sorted(p.name for p in pki.iterdir()) == ["ca.key", "ca.pem"]  # no temp files left

    ca_pem = (pki / "ca.pem").read_bytes()
    ca_key = (pki / "ca.key").read_bytes()
    r = runner.invoke(app, ["pki", "init", "--dir", str(pki)])
    assert r.exit_code == 2 and "--force" in r.stderr
    assert (pki / "ca.pem").read_bytes() == ca_pem and (pki / "ca.key").read_bytes() == ca_key

    r = runner.invoke(app, ["pki", "issue", "server", "superlink", "--dir", str(pki), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["dns"] == ["localhost"] and doc["ips"] == ["127.0.0.1", "::1"]
    assert _mode(pki / "superlink.key") == 0o600
    assert verify_server_cert((pki / "superlink.pem").read_bytes(), ca_pem, host="::1")["subject"] == doc["subject"]

    r = runner.invoke(app, ["pki", "issue", "server", "coordinator", "--dir", str(pki), "--dns", "coord.example.org",
                            "--ip", "10.0.0.5", "--days", "30", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["dns"] == ["coord.example.org"] and doc["ips"] == ["10.0.0.5"]
    r = runner.invoke(app, ["pki", "issue", "server", "coordinator", "--dir", str(pki)])
    assert r.exit_code == 2 and "already exists" in r.stderr

    r = runner.invoke(app, ["pki", "show", str(pki / "coordinator.pem"), "--ca", str(pki / "ca.pem"),
                            "--host", "coord.example.org", "--json"])
    assert r.exit_code == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["verified"] is True and shown["fingerprint_sha256"] == doc["fingerprint_sha256"]
    r = runner.invoke(app, ["pki", "show", str(pki / "coordinator.pem")])
    assert r.exit_code == 0 and "coord.example.org" in r.stdout and doc["fingerprint_sha256"] in r.stdout
    r = runner.invoke(app, ["pki", "show", str(pki / "coordinator.pem"), "--ca", str(pki / "ca.pem"), "--host", "localhost"])
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "not valid for host 'localhost'" in r.stderr
    assert r.stdout == ""

    other = tmp_path / "other.pem"
    other.write_bytes(new_ca("Test CA")[1])
    r = runner.invoke(app, ["pki", "show", str(pki / "superlink.pem"), "--ca", str(other)])
    assert r.exit_code == 2 and "not signed by CA" in r.stderr

    # --force replaces the CA; certificates of the old CA stop verifying
    r = runner.invoke(app, ["pki", "init", "--dir", str(pki), "--force"])
    assert r.exit_code == 0, r.stderr
    assert (pki / "ca.pem").read_bytes() != ca_pem and _mode(pki / "ca.key") == 0o600
    r = runner.invoke(app, ["pki", "show", str(pki / "superlink.pem"), "--ca", str(pki / "ca.pem")])
    assert r.exit_code == 2


def test_issue_node(tmp_path):
    pki = tmp_path / "pki"
    r = runner.invoke(app, ["pki", "issue", "node", "st-mary", "--dir", str(pki), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    key, pub = pki / "st-mary.node.key", pki / "st-mary.node.pub"
    assert doc["private_key"] == str(key) and doc["fingerprint"].startswith("SHA256:")
    assert _mode(key) == 0o600
    sk = load_ssh_private_key(key.read_bytes(), None)
    pk = load_ssh_public_key(pub.read_bytes())
    assert isinstance(sk, ec.EllipticCurvePrivateKey) and isinstance(pk.curve, ec.SECP384R1)
    assert sk.public_key().public_numbers() == pk.public_numbers()

    r = runner.invoke(app, ["pki", "show", str(pub), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["fingerprint"] == doc["fingerprint"]
    r = runner.invoke(app, ["pki", "issue", "node", "st-mary", "--dir", str(pki)])
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert load_ssh_private_key(key.read_bytes(), None).public_key().public_numbers() == pk.public_numbers()
    r = runner.invoke(app, ["pki", "issue", "node", "st-mary", "--dir", str(pki), "--force"])
    assert r.exit_code == 0 and doc["fingerprint"] not in r.stdout and r.stdout.startswith("SHA256:")


def test_bad_input_exits_2_and_writes_nothing(tmp_path):
    pki = tmp_path / "pki"
    for args in (["pki", "issue", "node", "bad name", "--dir", str(pki)],
                 ["pki", "issue", "node", "../escape", "--dir", str(pki)],
                 ["pki", "init", "--dir", str(pki), "--days", "0"],
                 ["pki", "issue", "server", "superlink", "--dir", str(pki)]):  # no CA yet
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
        assert not pki.exists()
    assert "pki init" in r.stderr

    assert runner.invoke(app, ["pki", "init", "--dir", str(pki)]).exit_code == 0
    before = sorted(p.name for p in pki.iterdir())
    for args, needle in ((["superlink/x"], "invalid"), (["-x"], ""), (["ca"], "clash"), (["x.node"], "clash"),
                         (["s", "--ip", "1.2.3"], "'1.2.3'"), (["s", "--dns", "bad_host"], "'bad_host'"),
                         (["s", "--days", "4000"], "outlive")):
        r = runner.invoke(app, ["pki", "issue", "server", *args, "--dir", str(pki)])
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        assert needle in r.stderr
    assert sorted(p.name for p in pki.iterdir()) == before

    (tmp_path / "junk.pem").write_text("not a certificate")
    r = runner.invoke(app, ["pki", "show", str(tmp_path / "junk.pem")])
    assert r.exit_code == 2 and "not a PEM" in r.stderr
    r = runner.invoke(app, ["pki", "show", str(tmp_path / "missing.pem")])
    assert r.exit_code == 2 and "does not exist" in r.stderr
    r = runner.invoke(app, ["pki", "show", str(pki / "ca.pem"), "--host", "localhost"])
    assert r.exit_code == 2 and "--ca" in r.stderr


def test_every_command_has_an_example():
    from evoclone.cli.pki import init, issue_node_cmd, issue_server_cmd, show

    for fn in (init, issue_server_cmd, issue_node_cmd, show):
        assert "Example: evoclone pki " in fn.__doc__
