"""The site's master keys (AES-256, for wrapping data keys), kept in `master.keys` (mode 0600).

Separate from `secret.key` (the pseudonymization key): rotating a master key must never
change a pseudonym.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path

from evoclone.privacy.envelope import new_key

KEYRING_FILE = "master.keys"


class Keyring:
    """Master key versions by id, one of them active."""

    def __init__(self, *, keys: dict[str, bytes], active: str) -> None:
        if active not in keys:
            raise ValueError(f"active master key {active!r} is not in the keyring")
        self.keys, self.active = dict(keys), active

    @property
    def active_key(self) -> bytes:
        """The key new data keys are wrapped with."""
        return self.keys[self.active]

    def __repr__(self) -> str:  # never show key material
        return f"Keyring(active={self.active!r}, versions={sorted(self.keys)})"


def _write(path: Path, ring: Keyring) -> None:
    doc = {"active": ring.active, "keys": {k: base64.b64encode(v).decode() for k, v in ring.keys.items()}}
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_keyring(site_dir: Path) -> Keyring:
    """A keyring with one fresh master key; refuses to replace an existing one."""
    path = site_dir / KEYRING_FILE
    if path.exists():
        raise FileExistsError(f"{path} already exists; a keyring is never overwritten")
    ring = Keyring(keys={"k1": new_key()}, active="k1")
    _write(path, ring)
    return ring


def load_keyring(site_dir: Path) -> Keyring:
    """The site's keyring; refuses one others can read."""
    path = site_dir / KEYRING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `evoclone site init` for this site directory")
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} is readable by others; run `chmod 600 {path}`")
    doc = json.loads(path.read_text())
    return Keyring(keys={k: base64.b64decode(v) for k, v in doc["keys"].items()}, active=doc["active"])


def save_keyring(site_dir: Path, ring: Keyring) -> None:
    """Persist a keyring atomically (mode 0600)."""
    _write(site_dir / KEYRING_FILE, ring)


def next_key_id(ring: Keyring) -> str:
    """A fresh key id, k<N+1>."""
    n = max(int(k[1:]) for k in ring.keys if k[1:].isdigit()) if ring.keys else 0
    candidate = f"k{n + 1}"
    return candidate if candidate not in ring.keys else f"k{secrets.token_hex(4)}"
