"""Sites: enrolment requests (unauthenticated, signed CSR), admin accept and revoke, certificates."""

from __future__ import annotations

from fastapi import APIRouter, status

from ... import sites as store
from ...audit import append_event
from ...models import Site, SiteCertificate, SiteCreate, SitePublic, SiteStatus
from ...state import study_ca
from ..deps import AdminUser, IdPath, ReaderUser, RequestId, SessionDep, SettingsDep

router = APIRouter(prefix="/sites", tags=["sites"])


@router.post("/enrol", response_model=SitePublic, status_code=status.HTTP_202_ACCEPTED,
             responses={409: {"description": "the site is already pending or active"},
                        422: {"description": "bad CSR or SuperNode key"}})
def enrol(body: SiteCreate, session: SessionDep, rid: RequestId) -> Site:
    """Ask to join: the site's name, a PEM CSR (CN = name, signed by its key) and its SuperNode public key."""
    site = store.enrol_site(session=session, data=body)
    append_event(session=session, action="site.enrol", outcome="pending", actor=f"site:{site.name}",
                 resource=f"site/{site.id}", detail={"supernode_fingerprint": site.supernode_fingerprint},
                 request_id=rid)
    session.commit()
    return site


@router.get("", response_model=list[SitePublic])
def list_sites(user: ReaderUser, session: SessionDep, status: SiteStatus | None = None) -> list[Site]:
    """Every site, or those with one status."""
    return store.list_sites(session=session, status=status)


@router.get("/{site_id}", response_model=SitePublic)
def show(site_id: IdPath, user: ReaderUser, session: SessionDep) -> Site:
    """One site."""
    return store.get_site(session=session, site_id=site_id)


@router.post("/{site_id}/accept", response_model=SitePublic)
def accept(site_id: IdPath, user: AdminUser, session: SessionDep, settings: SettingsDep, rid: RequestId) -> Site:
    """Accept a pending site: issue its certificate from the study CA and authorise its SuperNode key."""
    ca_key, ca_cert = study_ca(settings)
    site = store.accept_site(session=session, site_id=site_id, ca_key_pem=ca_key, ca_cert_pem=ca_cert)
    append_event(session=session, action="site.accept", outcome="ok", actor=user.username, role=user.role,
                 resource=f"site/{site.id}", detail={"certificate_serial": site.certificate_serial,
                                                     "supernode_fingerprint": site.supernode_fingerprint},
                 request_id=rid)
    session.commit()
    store.sync_node_keys(session=session, node_keys_dir=settings.node_keys_dir)
    return site


@router.post("/{site_id}/revoke", response_model=SitePublic)
def revoke(site_id: IdPath, user: AdminUser, session: SessionDep, settings: SettingsDep, rid: RequestId) -> Site:
    """Revoke a site: its SuperNode key is withdrawn; it may enrol again later."""
    site = store.revoke_site(session=session, site_id=site_id)
    append_event(session=session, action="site.revoke", outcome="ok", actor=user.username, role=user.role,
                 resource=f"site/{site.id}", detail={"certificate_serial": site.certificate_serial},
                 request_id=rid)
    session.commit()
    store.sync_node_keys(session=session, node_keys_dir=settings.node_keys_dir)
    return site


@router.get("/{site_id}/certificate", response_model=SiteCertificate)
def certificate(site_id: IdPath, session: SessionDep, settings: SettingsDep) -> SiteCertificate:
    """An accepted site's certificate and the study CA (public material: no token needed)."""
    _, ca_cert = study_ca(settings)
    return store.site_certificate(session=session, site_id=site_id, ca_cert_pem=ca_cert)
