"""Domain errors of the site's data access and services; the site API maps each to one HTTP status."""

from __future__ import annotations


class SiteError(Exception):
    """Base of the site's domain errors; the message is one line: what, where, what to do."""

    headers: dict[str, str] | None = None


class NotFound(SiteError):
    """A referenced record does not exist (the message never echoes a patient reference)."""


class Conflict(SiteError):
    """The request contradicts the current state (a duplicate username, a token already revoked, ...)."""


class InvalidInput(SiteError):
    """Well-formed input that the domain rejects."""


class AuthenticationFailed(SiteError):
    """Wrong credentials, or a token or session that is no longer usable."""


class TooManyAttempts(SiteError):
    """Too many logins from one address, or an account locked after failed logins; retry later."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))
        self.headers = {"Retry-After": str(self.retry_after)}


class StoreUnavailable(SiteError):
    """The session store (Redis) does not answer; logins and sessions are refused until it returns."""

    headers = {"Retry-After": "5"}
