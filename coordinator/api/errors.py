"""Every error the API returns is JSON `{"detail": "<one line>"}` with a fitting status (shared handlers)."""

from __future__ import annotations

from fastapi import FastAPI

from evoclone.federated.api_common import install_error_handlers, one_line, validation_message

from ..errors import AuthenticationFailed, Conflict, CoordinatorError, InvalidInput, NotFound

STATUS = {NotFound: 404, Conflict: 409, InvalidInput: 422, AuthenticationFailed: 401}
__all__ = ["STATUS", "install", "one_line", "validation_message"]


def install(app: FastAPI) -> None:
    """Register the handlers that turn errors into one-line JSON."""
    install_error_handlers(app, domain_error=CoordinatorError, statuses=STATUS)
