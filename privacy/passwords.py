"""Password hashing with argon2id (the library's recommended cost) and API tokens, shared by both services."""

from __future__ import annotations

import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# a hash of a random password: verifying against it costs what a real verification costs
_DUMMY = "$argon2id$v=19$m=65536,t=3,p=4$qsYopyKN+INMSeUnBlAueg$tsFYdOYTGeUrDGDcnTl0D5o9mV5xUv+f1PFh8AWLYy8"


def _hasher() -> PasswordHasher:
    return PasswordHasher()  # tests patch this for speed; production keeps the library default


def hash_password(password: str) -> str:
    """An argon2id hash of `password`."""
    return _hasher().hash(password)


def verify_password(password: str, password_hash: str) -> bool:
    """Whether `password` matches `password_hash` (False for a malformed hash)."""
    try:
        return _hasher().verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def dummy_verify(password: str) -> None:
    """Spend the time of one verification, so unknown users cannot be told apart by timing."""
    verify_password(password, _DUMMY)


def new_api_token(prefix: str) -> tuple[str, str]:
    """A 256-bit random bearer token starting with `prefix`, and the hash to store (shown once, kept hashed)."""
    token = prefix + secrets.token_urlsafe(32)
    return token, api_token_hash(token)


def api_token_hash(token: str) -> str:
    """The stored form of an API token: a plain sha256 suffices for 256 random bits (no password-hash cost)."""
    return hashlib.sha256(token.encode()).hexdigest()
