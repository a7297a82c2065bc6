"""Site enrolment: certificate signing requests and the site client certificates the study CA issues.

Pure library like `pki`: PEM bytes in and out, no I/O.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .pki import BACKDATE, PKIError, SERVER_CURVE, _check_cn, _check_days, _is_ca, _key_pem, _leaf, _load_ca, _load_cert, _subject, _summary, _utc

__all__ = ["csr_info", "issue_client_from_csr", "new_csr", "verify_client_cert"]


def new_csr(common_name: str) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key and a certificate signing request naming `common_name`. Returns (key PEM, CSR PEM)."""
    _check_cn(common_name)
    key = ec.generate_private_key(SERVER_CURVE())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(key, hashes.SHA256()))
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def _load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError) as exc:
        reason = (str(exc).splitlines() or ["unreadable"])[0]
        raise PKIError(f"the request is not a PEM certificate signing request ({reason}); "
                       "create one with `openssl req -new -key site.key -subj /CN=SITE`") from None
    if not csr.is_signature_valid:
        raise PKIError("the certificate signing request's signature does not verify; create a new one")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.key_size < 256:
        raise PKIError("the certificate signing request must carry an ECDSA key of at least 256 bits (P-256 or P-384)")
    return csr


def csr_info(csr_pem: bytes) -> dict:
    """Check a CSR (PEM, self-signature, ECDSA key) and return its common name and public key fingerprint."""
    csr = _load_csr(csr_pem)
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise PKIError("the certificate signing request must name exactly one common name (the site name)")
    spki = csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"common_name": str(cns[0].value), "public_key_sha256": hashlib.sha256(spki).hexdigest()}


def issue_client_from_csr(ca_key_pem: bytes, ca_cert_pem: bytes, csr_pem: bytes, *, common_name: str,
                          days: int = 365, now: datetime | None = None) -> bytes:
    """Issue a site (TLS client) certificate for the key in a verified CSR; the subject is `common_name` only.

    Whatever else the CSR asks for (extensions, other names) is ignored: the CA decides.
    """
    _check_cn(common_name)
    _check_days(days)
    csr = _load_csr(csr_pem)
    ca_key, ca_cert = _load_ca(ca_key_pem, ca_cert_pem)
    current = _utc(now)
    ca_start, ca_end = ca_cert.not_valid_before_utc, ca_cert.not_valid_after_utc
    if current < ca_start or current >= ca_end:
        raise ValueError(f"CA {_subject(ca_cert)} is not valid now (valid {ca_start.isoformat()} to "
                         f"{ca_end.isoformat()}); create a new CA")
    start = max(current - BACKDATE, ca_start)
    end = min(current + timedelta(days=days), ca_end)
    cert = _leaf(ca_key, ca_cert, csr.public_key(), common_name, start, end,
                 usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    return cert.public_bytes(serialization.Encoding.PEM)


def verify_client_cert(cert_pem: bytes, ca_cert_pem: bytes, *, name: str | None = None,
                       now: datetime | None = None) -> dict:
    """Verify a site certificate against the CA (signature, validity, clientAuth, common name); return its summary.

    The summary adds ``common_name`` and ``serial`` (hex) to certificate_info's keys.
    """
    cert = _load_cert(cert_pem, "site certificate")
    ca = _load_cert(ca_cert_pem, "CA certificate")
    who, when = _subject(cert), _utc(now)
    if not _is_ca(ca):
        raise PKIError(f"{_subject(ca)} is not a CA certificate; pass the study CA's ca.pem")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        raise PKIError(f"site certificate {who} was not issued by CA {_subject(ca)}; enrol the site again") from None
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise PKIError(f"site certificate {who} is not valid now (valid {cert.not_valid_before_utc.isoformat()} to "
                       f"{cert.not_valid_after_utc.isoformat()}); enrol the site again")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise PKIError(f"certificate {who} is not a site (TLS client) certificate; enrol the site again")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    if name is not None and cn != name:
        raise PKIError(f"site certificate {who} names {cn!r}, not {name!r}; use the certificate issued to {name!r}")
    return {**_summary(cert), "common_name": cn, "serial": format(cert.serial_number, "x")}
