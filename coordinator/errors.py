"""Domain errors of the coordinator's data access; the API maps each to one HTTP status."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base of the coordinator's domain errors; the message is one line: what, where, what to do."""


class NotFound(CoordinatorError):
    """A referenced record does not exist."""


class Conflict(CoordinatorError):
    """The request contradicts the current state (a duplicate name, a site not pending, ...)."""


class InvalidInput(CoordinatorError):
    """Well-formed input that the domain rejects (a bad CSR, an inactive site in a study, ...)."""


class AuthenticationFailed(CoordinatorError):
    """Wrong credentials or an unusable token."""
