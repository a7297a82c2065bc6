"""AES-256-GCM envelope encryption (cryptography): a data key per batch, wrapped by a master key.

Rotating the master key re-wraps the data keys only; the data itself is not re-encrypted.
Every ciphertext is authenticated, and bound to its context (associated data) so a record
moved to another row or batch fails to decrypt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12


class TamperedError(ValueError):
    """A ciphertext or wrapped key failed authentication: altered, moved, or the wrong key."""


@dataclass(frozen=True)
class WrappedKey:
    """A data key encrypted under a master key version."""

    master_id: str
    nonce: bytes
    ciphertext: bytes


def new_key() -> bytes:
    """A fresh random 256-bit key."""
    return AESGCM.generate_key(bit_length=256)


def _check_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        raise ValueError(f"{what} must be {KEY_BYTES} bytes")


def wrap(data_key: bytes, *, master_key: bytes, master_id: str) -> WrappedKey:
    """Encrypt a data key under the master key (the master id is authenticated too)."""
    _check_key(data_key, "data key")
    _check_key(master_key, "master key")
    nonce = os.urandom(NONCE_BYTES)
    return WrappedKey(master_id, nonce, AESGCM(master_key).encrypt(nonce, data_key, master_id.encode()))


def unwrap(wrapped: WrappedKey, *, master_key: bytes) -> bytes:
    """Recover a data key; TamperedError when the wrapped key or master key is wrong."""
    _check_key(master_key, "master key")
    try:
        return AESGCM(master_key).decrypt(wrapped.nonce, wrapped.ciphertext, wrapped.master_id.encode())
    except InvalidTag:
        raise TamperedError(f"data key wrapped under master key {wrapped.master_id!r} failed authentication") from None


def rewrap(wrapped: WrappedKey, *, old_master: bytes, new_master: bytes, new_id: str) -> WrappedKey:
    """Re-wrap a data key under a new master key without touching the data it protects."""
    return wrap(unwrap(wrapped, master_key=old_master), master_key=new_master, master_id=new_id)


def seal(plaintext: bytes, *, data_key: bytes, context: bytes) -> bytes:
    """nonce || AES-256-GCM(plaintext), authenticated together with `context`."""
    _check_key(data_key, "data key")
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(data_key).encrypt(nonce, plaintext, context)


def open_sealed(blob: bytes, *, data_key: bytes, context: bytes) -> bytes:
    """Decrypt what `seal` produced; TamperedError when anything was altered."""
    _check_key(data_key, "data key")
    if len(blob) < NONCE_BYTES + 16:
        raise TamperedError("ciphertext is truncated")
    try:
        return AESGCM(data_key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], context)
    except InvalidTag:
        raise TamperedError("ciphertext failed authentication (altered, moved to another record, or wrong key)") from None
