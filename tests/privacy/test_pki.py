import base64
import hashlib
import shutil
import socket
import ssl
import subprocess
import threading
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from evoclone.privacy.pki import (
    PKIError,
    certificate_info,
    issue_server,
    new_ca,
    new_node_keypair,
    public_key_fingerprint,
    verify_server_cert,
)


@pytest.fixture(scope="module")
def ca():
    return new_ca("EvoClone Test CA")


@pytest.fixture(scope="module")
def server(ca):
    return issue_server(*ca, "superlink", dns=["localhost", "Coord.Example.org"], ips=["127.0.0.1", "::1"])


def test_ca_extensions(ca):
    cert = x509.load_pem_x509_certificate(ca[1])
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.issuer == cert.subject
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(cert)  # self-signed


def test_server_cert_chain_verifies(ca, server):
    cert = x509.load_pem_x509_certificate(server[1])
    ca_cert = x509.load_pem_x509_certificate(ca[1])
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc

    info = verify_server_cert(server[1], ca[1], host="localhost")
    assert info["dns"] == ["localhost", "coord.example.org"] and info["ips"] == ["127.0.0.1", "::1"]
    assert info["subject"].endswith("CN=superlink") and "EvoClone Test CA" in info["issuer"]
    assert info["fingerprint_sha256"].replace(":", "").lower() == cert.fingerprint(hashes.SHA256()).hex()
    assert datetime.fromisoformat(info["not_after"]) == cert.not_valid_after_utc
    for host in ("127.0.0.1", "::1", "COORD.example.org", "coord.example.org."):
        assert verify_server_cert(server[1], ca[1], host=host) == info
    assert verify_server_cert(server[1], ca[1]) == certificate_info(server[1]) == info


def test_cert_from_another_ca_is_rejected(server):
    _, other_same_name = new_ca("EvoClone Test CA")
    with pytest.raises(PKIError, match="not signed by CA"):
        verify_server_cert(server[1], other_same_name)
    _, other = new_ca("Other CA")
    with pytest.raises(PKIError, match="issued by .*EvoClone Test CA.*not by CA .*Other CA"):
        verify_server_cert(server[1], other)


def test_expired_and_not_yet_valid_certs_are_rejected():
    past = datetime.now(timezone.utc) - timedelta(days=30)
    early_key, early_ca = new_ca("Early CA", now=past)
    _, old = issue_server(early_key, early_ca, "old", dns=["localhost"], ips=[], days=7, now=past)
    assert verify_server_cert(old, early_ca, now=past + timedelta(days=1))["dns"] == ["localhost"]
    with pytest.raises(PKIError) as exc:
        verify_server_cert(old, early_ca, host="localhost")
    msg = str(exc.value)
    assert "expired on " + (past + timedelta(days=7)).replace(microsecond=0).isoformat() in msg
    assert "CN=old" in msg and "re-issue with `evoclone pki issue server`" in msg and "\n" not in msg
    with pytest.raises(PKIError, match="not yet valid"):
        verify_server_cert(old, early_ca, now=past - timedelta(days=1))
    with pytest.raises(ValueError, match="not valid now"):  # a CA made today cannot issue in the past
        issue_server(*new_ca("Today CA"), "x", dns=["localhost"], ips=[], now=past)


def test_san_mismatch_is_rejected(ca, server):
    for host in ("example.org", "127.0.0.2", "::2", "local"):
        with pytest.raises(PKIError, match="not valid for host"):
            verify_server_cert(server[1], ca[1], host=host)


def test_ca_and_garbage_are_not_server_certs(ca, server):
    with pytest.raises(PKIError, match="is a CA certificate"):
        verify_server_cert(ca[1], ca[1])
    with pytest.raises(PKIError, match="not a CA certificate"):
        verify_server_cert(server[1], server[1])
    with pytest.raises(PKIError, match="not a PEM"):
        verify_server_cert(b"hello", ca[1])
    with pytest.raises(PKIError, match="not a PEM"):
        certificate_info(ca[0])


@pytest.mark.parametrize("dns, ips, needle", [
    ([], [], "at least one"),
    (["bad_name"], [], "'bad_name'"),
    (["-x.example"], [], "'-x.example'"),
    (["a..b"], [], "'a..b'"),
    (["10.0.0.1"], [], "'10.0.0.1'"),
    ([], ["1.2.3"], "'1.2.3'"),
    ([], ["localhost"], "'localhost'"),
])
def test_issue_rejects_bad_sans(ca, dns, ips, needle):
    with pytest.raises(ValueError, match=needle):
        issue_server(*ca, "x", dns=dns, ips=ips)


def test_validity_may_not_exceed_the_ca(ca):
    # certificates carry whole seconds: a CA issued a moment ago has 3649 or 3650 whole days left
    with pytest.raises(ValueError, match="outlive CA .* use at most 36(49|50) days"):
        issue_server(*ca, "x", dns=["localhost"], ips=[], days=3651)
    with pytest.raises(ValueError, match="outlive"):
        issue_server(*ca, "x", dns=["localhost"], ips=[], days=100, now=datetime.now(timezone.utc) + timedelta(days=3600))
    with pytest.raises(ValueError, match="not valid now"):
        issue_server(*ca, "x", dns=["localhost"], ips=[], days=1, now=datetime.now(timezone.utc) + timedelta(days=4000))
    with pytest.raises(ValueError, match="days"):
        issue_server(*ca, "x", dns=["localhost"], ips=[], days=0)
    other_key, _ = new_ca("Other")
    with pytest.raises(ValueError, match="does not belong"):
        issue_server(other_key, ca[1], "x", dns=["localhost"], ips=[])


def test_validity_window_follows_now():
    now = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
    key, cert = new_ca("Pinned", days=10, now=now)
    _, srv = issue_server(key, cert, "s", dns=["localhost"], ips=[], days=3, now=now)
    info = certificate_info(srv)
    assert info["not_after"] == "2030-01-04T12:00:00+00:00"
    assert certificate_info(cert)["not_after"] == "2030-01-11T12:00:00+00:00"
    assert datetime.fromisoformat(info["not_before"]) <= now


def _handshake(tmp_path, server_pair, ca_pem, server_hostname):
    (tmp_path / "srv.key").write_bytes(server_pair[0])
    (tmp_path / "srv.pem").write_bytes(server_pair[1])
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    cctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    cctx.verify_flags |= ssl.VERIFY_X509_STRICT  # the default from Python 3.13 on
    result: dict = {}

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve():
            try:
                conn, _ = listener.accept()
                conn.settimeout(5)
                with sctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello over tls")
                    result["server"] = "ok"
            except (ssl.SSLError, OSError) as exc:
                result["server"] = exc

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=5) as raw, \
                    cctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                result["client"] = tls.recv(100)
                result["peer"] = tls.getpeercert()
        except (ssl.SSLError, OSError) as exc:
            result["client"] = exc
        thread.join(10)
    assert not thread.is_alive()
    return result


def test_tls_handshake_with_issued_cert(tmp_path, ca, server):
    result = _handshake(tmp_path, server, ca[1], "localhost")
    assert result["client"] == b"hello over tls" and result["server"] == "ok"
    assert ("DNS", "localhost") in result["peer"]["subjectAltName"]
    result = _handshake(tmp_path, server, ca[1], "127.0.0.1")  # IP SAN
    assert result["client"] == b"hello over tls"


def test_tls_handshake_fails_with_another_ca_or_name(tmp_path, ca, server):
    _, other = new_ca("EvoClone Test CA")
    result = _handshake(tmp_path, server, other, "localhost")
    assert isinstance(result["client"], ssl.SSLCertVerificationError)
    assert isinstance(result["server"], (ssl.SSLError, OSError))
    result = _handshake(tmp_path, server, ca[1], "example.org")
    assert isinstance(result["client"], ssl.SSLCertVerificationError)


def test_node_keypair_is_what_flower_accepts():
    from flwr.supercore.primitives.asymmetric import (
        public_key_to_bytes,
        sign_message,
        uses_nist_ec_curve,
        verify_signature,
    )

    private, public = new_node_keypair("st-mary")
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.count(b"\n") == 1 and public.startswith(b"ecdsa-sha2-nistp384 ") and public.endswith(b" st-mary\n")
    sk = load_ssh_private_key(private, None)  # what flower-supernode --auth-supernode-private-key does
    pk = load_ssh_public_key(public)  # what `flwr supernode register` does
    assert isinstance(sk, ec.EllipticCurvePrivateKey) and isinstance(pk, ec.EllipticCurvePublicKey)
    assert isinstance(sk.curve, ec.SECP384R1) and uses_nist_ec_curve(pk)
    assert public_key_to_bytes(sk.public_key()) == public_key_to_bytes(pk)
    assert verify_signature(pk, b"timestamp", sign_message(sk, b"timestamp"))
    assert new_node_keypair()[1].count(b" ") == 1  # no comment
    with pytest.raises(ValueError, match="single line"):
        new_node_keypair("a\nb")


def test_fingerprint_matches_ssh_keygen(tmp_path):
    _, public = new_node_keypair("x")
    blob = base64.b64decode(public.split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    fp = public_key_fingerprint(public)
    assert fp == expected and not fp.endswith("=")
    assert public_key_fingerprint(public.split(b" x")[0]) == fp
    with pytest.raises(ValueError):
        public_key_fingerprint(b"ecdsa-sha2-nistp384 not-base64!")
    if shutil.which("ssh-keygen"):
        (tmp_path / "k.pub").write_bytes(public)
        out = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], capture_output=True, text=True, check=True)
        assert out.stdout.split()[1] == fp
