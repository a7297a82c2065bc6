"""A small PKI: a private CA, TLS server certificates and Flower SuperNode key pairs.

Pure library: no file or network I/O; every function takes and returns PEM / OpenSSH
bytes. Apart from the random key material (and nothing derived from it) the output is
a function of the arguments; pass ``now`` to pin the validity window (tests use it to
make expired certificates).

Key types:

- CA and server certificates: ECDSA P-256 keys signed with ECDSA-SHA256, accepted by
  gRPC (Flower SuperLink TLS), uvicorn / Python ``ssl`` and every TLS 1.2/1.3 client.
- SuperNode authentication keys: ECDSA P-384 in OpenSSH format. Flower 1.42 loads the
  private key with ``load_ssh_private_key`` and requires an ``EllipticCurvePrivateKey``;
  ``flwr supernode register`` loads the public key with ``load_ssh_public_key`` and
  requires a NIST curve (P-192/224/256/384/521). P-384 is the curve Flower itself
  generates and documents.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "PKIError",
    "certificate_info",
    "issue_server",
    "new_ca",
    "new_node_keypair",
    "public_key_fingerprint",
    "verify_server_cert",
]

CA_CURVE = ec.SECP256R1
SERVER_CURVE = ec.SECP256R1
NODE_CURVE = ec.SECP384R1  # what Flower generates and documents for SuperNode auth
BACKDATE = timedelta(minutes=5)  # tolerate small clock skew between machines

_DNS_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class PKIError(ValueError):
    """A certificate failed verification; the message is one line: what, which cert, what to do."""


# --------------------------------------------------------------------------- helpers


def _utc(now: datetime | None) -> datetime:
    if now is None:
        now = datetime.now(timezone.utc)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    else:
        now = now.astimezone(timezone.utc)
    return now.replace(microsecond=0)


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive whole number, got {days!r}")


def _check_cn(common_name: str) -> None:
    if not isinstance(common_name, str) or not common_name.strip():
        raise ValueError("common name must not be empty")
    if len(common_name) > 64:
        raise ValueError(f"common name {common_name!r} is longer than 64 characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in common_name):
        raise ValueError(f"common name {common_name!r} contains control characters")


def _serial(public_key: ec.EllipticCurvePublicKey, subject: x509.Name, not_before: datetime) -> int:
    """A positive 159-bit serial derived from the (random) key: unique without extra randomness."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(spki + subject.public_bytes() + not_before.isoformat().encode()).digest()
    return (int.from_bytes(digest[:20], "big") >> 1) or 1


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except (ValueError, TypeError) as exc:
        reason = (str(exc).splitlines() or ["unreadable"])[0]
        raise PKIError(f"{what} is not a PEM X.509 certificate ({reason})") from None


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return san.get_values_for_type(x509.DNSName), [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def _normalize_dns(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"invalid DNS name {name!r}")
    value = name.strip().rstrip(".").lower()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        raise ValueError(f"invalid DNS name {name!r}: it is an IP address, pass it as an IP SAN")
    labels = value.split(".")
    if not value or len(value) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(f"invalid DNS name {name!r}: use letters, digits, hyphens and dots (e.g. site-a.example.org)")
    return value


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"invalid IP address {value!r}") from None


def _load_ca(ca_key_pem: bytes, ca_cert_pem: bytes) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_cert = _load_cert(ca_cert_pem, "CA certificate")
    try:
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("CA key is not an unencrypted PEM private key") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("CA key is not an ECDSA key")
    if not _is_ca(ca_cert):
        raise ValueError(f"certificate {_subject(ca_cert)} is not a CA certificate")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if ca_key.public_key().public_bytes(*spki) != ca_cert.public_key().public_bytes(*spki):
        raise ValueError(f"CA key does not belong to CA certificate {_subject(ca_cert)}")
    return ca_key, ca_cert


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


# --------------------------------------------------------------------------- issuing


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, public_key, common_name: str,
          start: datetime, end: datetime, *, usages: list, extra: list | None = None) -> x509.Certificate:
    """An end-entity certificate for `public_key` signed by the CA (server and site client certificates)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EvoClone")])
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(_serial(public_key, subject, start))
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    for ext in extra or []:
        builder = builder.add_extension(ext, critical=False)
    return (builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(aki, critical=False).sign(ca_key, hashes.SHA256()))


def new_ca(common_name: str, *, days: int = 3650, now: datetime | None = None) -> tuple[bytes, bytes]:
    """Create a self-signed CA (ECDSA P-256, path length 0). Returns (key PEM, certificate PEM)."""
    _check_cn(common_name)
    _check_days(days)
    start = _utc(now) - BACKDATE
    key = ec.generate_private_key(CA_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EvoClone")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial(key.public_key(), name, start))
        .not_valid_before(start)
        .not_valid_after(start + BACKDATE + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def issue_server(ca_key_pem: bytes, ca_cert_pem: bytes, common_name: str, *, dns: list[str], ips: list[str],
                 days: int = 825, now: datetime | None = None) -> tuple[bytes, bytes]:
    """Issue a TLS server certificate (ECDSA P-256, serverAuth + clientAuth). Returns (key PEM, certificate PEM).

    At least one SAN is required; invalid DNS names or IP addresses raise ValueError naming
    the value. The certificate may not outlive the CA nor start before it.
    """
    _check_cn(common_name)
    _check_days(days)
    dns_names = list(dict.fromkeys(_normalize_dns(d) for d in (dns or [])))
    ip_addrs = list(dict.fromkeys(_parse_ip(i) for i in (ips or [])))
    if not dns_names and not ip_addrs:
        raise ValueError("a server certificate needs at least one DNS name or IP address (SAN)")
    ca_key, ca_cert = _load_ca(ca_key_pem, ca_cert_pem)
    current = _utc(now)
    ca_start, ca_end = ca_cert.not_valid_before_utc, ca_cert.not_valid_after_utc
    if current < ca_start or current >= ca_end:
        raise ValueError(f"CA {_subject(ca_cert)} is not valid now (valid {ca_start.isoformat()} to "
                         f"{ca_end.isoformat()}); create a new CA with `evoclone pki init --force`")
    start = max(current - BACKDATE, ca_start)
    end = current + timedelta(days=days)
    if end > ca_end:
        left = (ca_end - current).days
        raise ValueError(f"a {days}-day certificate would outlive CA {_subject(ca_cert)}, which expires "
                         f"{ca_end.isoformat()}; use at most {left} days or create a new CA")
    key = ec.generate_private_key(SERVER_CURVE())
    san = [x509.DNSName(d) for d in dns_names] + [x509.IPAddress(i) for i in ip_addrs]
    cert = _leaf(ca_key, ca_cert, key.public_key(), common_name, start, end,
                 usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                 extra=[x509.SubjectAlternativeName(san)])
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def new_node_keypair(comment: str = "") -> tuple[bytes, bytes]:
    """A Flower SuperNode authentication key pair: ECDSA P-384.

    Returns (private key in OpenSSH PEM format, unencrypted; public key as one OpenSSH line
    ``ecdsa-sha2-nistp384 AAAA... [comment]`` ending in a newline).
    """
    if not isinstance(comment, str) or any(c.isspace() and c != " " for c in comment) or \
            any(ord(c) < 32 or ord(c) == 127 for c in comment):
        raise ValueError(f"key comment {comment!r} must be a single line without tabs or control characters")
    key = ec.generate_private_key(NODE_CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment.strip():
        public += b" " + comment.strip().encode()
    return private, public + b"\n"


def public_key_fingerprint(public_ssh: bytes) -> str:
    """The ssh-keygen style fingerprint of an OpenSSH public key line: ``SHA256:<base64, no padding>``."""
    parts = public_ssh.strip().split()
    if len(parts) < 2:
        raise ValueError("not an OpenSSH public key line (expected '<type> <base64> [comment]')")
    try:
        blob = base64.b64decode(parts[1], validate=True)
        serialization.load_ssh_public_key(b" ".join(parts[:2]))
    except (binascii.Error, ValueError, UnsupportedAlgorithm):
        raise ValueError("not a valid OpenSSH public key line") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


# --------------------------------------------------------------------------- inspecting


def _summary(cert: x509.Certificate) -> dict:
    dns, ips = _sans(cert)
    return {
        "subject": _subject(cert),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "dns": dns,
        "ips": ips,
        "fingerprint_sha256": _fingerprint(cert),
    }


def certificate_info(cert_pem: bytes) -> dict:
    """Summary of a certificate, without verification.

    Keys: subject, issuer, not_before, not_after (ISO 8601, UTC), dns, ips, fingerprint_sha256.
    """
    return _summary(_load_cert(cert_pem, "file"))


def _as_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        return None


def _host_matches(host: str, dns: list[str], ips: list[str]) -> bool:
    addr = _as_ip(host)
    if addr is None:
        wanted = host.strip().rstrip(".").lower()
        return any(wanted == d.rstrip(".").lower() for d in dns)
    return any(addr == ipaddress.ip_address(i) for i in ips)


def verify_server_cert(cert_pem: bytes, ca_cert_pem: bytes, *, host: str | None = None,
                       now: datetime | None = None) -> dict:
    """Verify a server certificate against the CA (and ``host`` if given); return its summary.

    Raises PKIError with a one-line message (what failed, which certificate, what to do)
    when the certificate is not issued by this CA, is expired or not yet valid, is not a
    TLS server certificate, or does not name ``host`` (a DNS name or IP address).
    """
    cert = _load_cert(cert_pem, "certificate")
    ca = _load_cert(ca_cert_pem, "CA certificate")
    who = _subject(cert)
    when = _utc(now)
    reissue = "re-issue with `evoclone pki issue server`"

    if not _is_ca(ca):
        raise PKIError(f"{_subject(ca)} is not a CA certificate; pass the CA's ca.pem")
    if _is_ca(cert):
        raise PKIError(f"certificate {who} is a CA certificate, not a server certificate; "
                       "pass a certificate made by `evoclone pki issue server`")
    if cert.issuer != ca.subject:
        raise PKIError(f"certificate {who} was issued by {cert.issuer.rfc4514_string()}, not by CA {_subject(ca)}; "
                       f"{reissue} using this CA, or pass the CA that issued it")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        raise PKIError(f"certificate {who} is not signed by CA {_subject(ca)} (signature check failed; "
                       f"a different CA with the same name?); {reissue} using this CA") from None

    ca_start, ca_end = ca.not_valid_before_utc, ca.not_valid_after_utc
    if not ca_start <= when <= ca_end:
        state = "expired" if when > ca_end else "is not yet valid"
        raise PKIError(f"CA certificate {_subject(ca)} {state} (valid {ca_start.isoformat()} to "
                       f"{ca_end.isoformat()}, now {when.isoformat()}); create a new CA with `evoclone pki init --force`")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if when > end:
        raise PKIError(f"certificate {who} expired on {end.isoformat()} (valid from {start.isoformat()}, "
                       f"now {when.isoformat()}); {reissue}")
    if when < start:
        raise PKIError(f"certificate {who} is not yet valid: valid from {start.isoformat()} to {end.isoformat()}, "
                       f"now {when.isoformat()} (check the clock); {reissue}")

    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise PKIError(f"certificate {who} is not allowed for TLS servers (no serverAuth usage); {reissue}")

    dns, ips = _sans(cert)
    if not dns and not ips:
        raise PKIError(f"certificate {who} names no DNS name or IP address (no SAN); {reissue} --dns/--ip ...")
    if host is not None and not _host_matches(host, dns, ips):
        flag = "--ip" if _as_ip(host) is not None else "--dns"
        raise PKIError(f"certificate {who} is not valid for host {host!r} (it names dns={dns}, ips={ips}); "
                       f"re-issue with `evoclone pki issue server NAME {flag} {host.strip()}`")

    # Full path validation with cryptography's verifier (webpki profile) as a second opinion.
    from cryptography.x509 import DNSName, IPAddress
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    target = host if host is not None else (dns[0] if dns else ips[0])
    addr = _as_ip(target)
    subject = IPAddress(addr) if addr is not None else DNSName(target.strip().rstrip(".").lower())
    try:
        verifier = PolicyBuilder().store(Store([ca])).time(when).build_server_verifier(subject)
        verifier.verify(cert, [])
    except VerificationError as exc:
        raise PKIError(f"certificate {who} failed path validation against CA {_subject(ca)} "
                       f"({str(exc).splitlines()[0]}); {reissue}") from None
    return _summary(cert)
