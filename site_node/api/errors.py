"""Every error the site API returns is JSON `{"detail": "<one line>"}` with a fitting status."""

from __future__ import annotations

from fastapi import FastAPI

from evoclone.federated.api_common import install_error_handlers

from ..errors import AuthenticationFailed, Conflict, InvalidInput, NotFound, SiteError, StoreUnavailable, \
    TooManyAttempts

STATUS = {NotFound: 404, Conflict: 409, InvalidInput: 422, AuthenticationFailed: 401, TooManyAttempts: 429,
          StoreUnavailable: 503}


def install(app: FastAPI) -> None:
    """Register the handlers that turn errors into one-line JSON."""
    install_error_handlers(app, domain_error=SiteError, statuses=STATUS)
