"""Dependencies of the registry's routes: the object store, the signing key, and site callers (site tokens).

Kept next to deps.py rather than in it while deps.py is edited elsewhere; same conventions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import anyio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, HTTPException, Request, status

from evoclone.federated.stores.objects import ObjectStore

from ..models import Site
from ..registry import object_store
from ..signing import load_key
from ..site_tokens import authenticate_site, is_site_token
from .deps import Principal, SessionDep, SettingsDep, TokenDep, get_current_user


def get_objects(request: Request, settings: SettingsDep) -> ObjectStore:
    """The app's object store (created once per app: a MinIO client keeps its connection pool)."""
    store = getattr(request.app.state, "objects", None)
    if store is None:
        store = request.app.state.objects = object_store(settings)
    return store


ObjectsDep = Annotated[ObjectStore, Depends(get_objects)]


def get_signing_key(settings: SettingsDep) -> Ed25519PrivateKey:
    """The coordinator's Ed25519 key, read from the state directory (refused when others can read it)."""
    return load_key(settings)


SigningKeyDep = Annotated[Ed25519PrivateKey, Depends(get_signing_key)]


def get_current_site(request: Request, session: SessionDep, token: TokenDep) -> Site:
    """The active site whose API token was presented; 401 otherwise."""
    if not is_site_token(token):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "this endpoint takes a site token (evs_...) as Bearer; "
                            "the coordinator admin issues one with POST /api/v1/sites/{site_id}/tokens",
                            headers={"WWW-Authenticate": "Bearer"})
    site = authenticate_site(session=session, token=token)
    request.state.actor, request.state.role = f"site:{site.name}", "site"
    return site


CurrentSite = Annotated[Site, Depends(get_current_site)]


@dataclass(frozen=True)
class Caller:
    """A user (any role) or a site, for endpoints both may call."""

    user: Principal | None = None
    site: Site | None = None


async def get_caller(request: Request, session: SessionDep, settings: SettingsDep, token: TokenDep) -> Caller:
    """A site when a site token is presented, else the user of an access token; 401 otherwise."""
    if is_site_token(token):
        return Caller(site=await anyio.to_thread.run_sync(get_current_site, request, session, token))
    return Caller(user=await get_current_user(request, session, settings, token))


CallerDep = Annotated[Caller, Depends(get_caller)]
