"""Site enrolment: a CSR and a SuperNode key arrive pending; an admin accepts (certificate issued,
SuperNode key registered) or revokes; a revoked site may enrol again."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from sqlmodel import Session, select

from evoclone.privacy.enrolment import csr_info, issue_client_from_csr, verify_client_cert
from evoclone.privacy.pki import PKIError, public_key_fingerprint

from .errors import Conflict, InvalidInput, NotFound
from .models import Site, SiteCertificate, SiteCreate, SiteStatus

NODE_KEY_TYPES = (b"ecdsa-sha2-nistp256", b"ecdsa-sha2-nistp384", b"ecdsa-sha2-nistp521")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _check_request(data: SiteCreate) -> str:
    """Validate the CSR and SuperNode key of an enrolment request; returns the key's fingerprint."""
    try:
        info = csr_info(data.csr_pem.encode())
    except PKIError as exc:
        raise InvalidInput(f"csr_pem: {exc}") from None
    if info["common_name"] != data.name:
        raise InvalidInput(f"csr_pem: the CSR names {info['common_name']!r} but the site is {data.name!r}; "
                           f"create the CSR with CN={data.name}")
    key = data.supernode_public_key.strip().encode()
    if not key.startswith(NODE_KEY_TYPES):
        raise InvalidInput("supernode_public_key: Flower needs an OpenSSH ECDSA key (ecdsa-sha2-nistp384 ...); "
                           "create one with `evoclone pki issue node`")
    try:
        return public_key_fingerprint(key)
    except ValueError as exc:
        raise InvalidInput(f"supernode_public_key: {exc}") from None


def enrol_site(*, session: Session, data: SiteCreate) -> Site:
    """Store an enrolment request as pending (a revoked site's record is reused: re-enrolment)."""
    fingerprint = _check_request(data)
    site = session.exec(select(Site).where(Site.name == data.name)).first()
    if site is not None and site.status != SiteStatus.revoked:
        raise Conflict(f"site {data.name!r} is already {site.status.value}; an admin must revoke it before it "
                       "can enrol again")
    clash = session.exec(select(Site).where(Site.supernode_fingerprint == fingerprint,
                                            Site.status != SiteStatus.revoked)).first()
    if clash is not None:
        raise Conflict(f"supernode_public_key is already used by site {clash.name!r}; generate a new key pair")
    if site is None:
        site = Site(name=data.name, csr_pem=data.csr_pem, supernode_public_key="", supernode_fingerprint="")
    site.csr_pem, site.supernode_public_key = data.csr_pem, data.supernode_public_key.strip()
    site.supernode_fingerprint, site.status, site.requested_at = fingerprint, SiteStatus.pending, _now()
    site.certificate_pem = site.certificate_serial = site.certificate_fingerprint = None
    site.certificate_not_after = site.enrolled_at = site.revoked_at = None
    session.add(site)
    session.flush()
    return site


def list_sites(*, session: Session, status: SiteStatus | None = None) -> list[Site]:
    """Every site (or those with `status`), by id."""
    query = select(Site).order_by(Site.id)
    if status is not None:
        query = query.where(Site.status == status)
    return list(session.exec(query).all())


def get_site(*, session: Session, site_id: int) -> Site:
    """The site with `site_id`; NotFound otherwise."""
    site = session.get(Site, site_id)
    if site is None:
        raise NotFound(f"site {site_id} does not exist; list sites with GET /api/v1/sites")
    return site


def accept_site(*, session: Session, site_id: int, ca_key_pem: bytes, ca_cert_pem: bytes, days: int = 365) -> Site:
    """Issue the pending site's certificate from the study CA and mark it active."""
    site = session.get(Site, site_id, with_for_update=True)
    if site is None:
        raise NotFound(f"site {site_id} does not exist; list sites with GET /api/v1/sites")
    if site.status != SiteStatus.pending:
        raise Conflict(f"site {site.name!r} is {site.status.value}, not pending; only a pending request can be "
                       "accepted")
    cert = issue_client_from_csr(ca_key_pem, ca_cert_pem, site.csr_pem.encode(), common_name=site.name, days=days)
    info = verify_client_cert(cert, ca_cert_pem, name=site.name)
    site.certificate_pem = cert.decode()
    site.certificate_serial = info["serial"]
    site.certificate_fingerprint = info["fingerprint_sha256"]
    site.certificate_not_after = datetime.fromisoformat(info["not_after"])
    site.status, site.enrolled_at, site.revoked_at = SiteStatus.active, _now(), None
    session.add(site)
    session.flush()
    return site


def revoke_site(*, session: Session, site_id: int) -> Site:
    """Revoke a pending or active site: its SuperNode key is no longer accepted."""
    site = session.get(Site, site_id, with_for_update=True)
    if site is None:
        raise NotFound(f"site {site_id} does not exist; list sites with GET /api/v1/sites")
    if site.status == SiteStatus.revoked:
        raise Conflict(f"site {site.name!r} is already revoked")
    site.status, site.revoked_at = SiteStatus.revoked, _now()
    session.add(site)
    session.flush()
    return site


def site_certificate(*, session: Session, site_id: int, ca_cert_pem: bytes) -> SiteCertificate:
    """The certificate of an active site, with the CA that issued it."""
    site = get_site(session=session, site_id=site_id)
    if site.status != SiteStatus.active or not site.certificate_pem or site.certificate_not_after is None:
        raise NotFound(f"site {site.name!r} is {site.status.value} and has no certificate; an admin accepts it "
                       f"with POST /api/v1/sites/{site_id}/accept")
    return SiteCertificate(site=site.name, certificate_pem=site.certificate_pem, ca_pem=ca_cert_pem.decode(),
                           not_after=site.certificate_not_after)


def sync_node_keys(*, session: Session, node_keys_dir: Path) -> list[str]:
    """Make `node_keys_dir` hold exactly the active sites' SuperNode keys (`<site>.pub`); returns their names.

    The SuperLink supervisor registers what this directory holds and unregisters what leaves it.
    """
    node_keys_dir.mkdir(parents=True, exist_ok=True)
    active = {s.name: s.supernode_public_key for s in list_sites(session=session, status=SiteStatus.active)}
    for path in node_keys_dir.glob("*.pub"):
        if path.stem not in active:
            path.unlink(missing_ok=True)
    for name, key in active.items():
        path = node_keys_dir / f"{name}.pub"
        text = key.strip() + "\n"
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
    return sorted(active)
