"""The coordinator's state directory: settings file, JWT secret, study CA, TLS certificates, signing key."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from evoclone.privacy.pki import issue_server, new_ca

from .settings import JWT_SECRET_FILE, SETTINGS_FILE, CoordinatorSettings, load_settings, read_secret_file


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with exactly `mode` (never overwriting)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def init_state(state_dir: Path, *, database_url: str = "", dns: list[str] | None = None,
               ips: list[str] | None = None, superlink_port: int = 9093, tls: bool = True) -> CoordinatorSettings:
    """Create a state directory: settings, a 0600 JWT secret, the study CA, TLS certificates, an Ed25519 key."""
    state_dir = state_dir.absolute()
    if (state_dir / SETTINGS_FILE).exists():
        raise FileExistsError(f"{state_dir} is already a coordinator state directory; its keys are never "
                              "overwritten (choose another --state-dir)")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    pki = state_dir / "pki"
    pki.mkdir(exist_ok=True, mode=0o700)
    _write(state_dir / JWT_SECRET_FILE, secrets.token_urlsafe(48).encode(), 0o600)
    ca_key, ca_cert = new_ca("EvoClone study CA")
    _write(pki / "ca.key", ca_key, 0o600)
    _write(pki / "ca.pem", ca_cert, 0o644)
    names = sorted({"localhost", *(dns or [])})
    addrs = sorted({"127.0.0.1", *(ips or [])})
    for name in ("coordinator", "superlink"):
        key, cert = issue_server(ca_key, ca_cert, name, dns=names, ips=addrs)
        _write(pki / f"{name}.key", key, 0o600)
        _write(pki / f"{name}.pem", cert, 0o644)
    signing = Ed25519PrivateKey.generate()
    _write(state_dir / "signing.key", signing.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()), 0o600)
    _write(state_dir / "signing.pub", signing.public_key().public_bytes(serialization.Encoding.PEM,
                                                                          serialization.PublicFormat.SubjectPublicKeyInfo),
           0o644)
    cfg: dict = {"superlink_port": superlink_port}
    if database_url:
        cfg["database_url"] = database_url
    if tls:
        cfg.update(tls_cert=str(pki / "coordinator.pem"), tls_key=str(pki / "coordinator.key"))
    _write(state_dir / SETTINGS_FILE, (json.dumps(cfg, indent=1) + "\n").encode(), 0o600)
    for sub in ("objects", "supernode-keys", "flower"):
        (state_dir / sub).mkdir(exist_ok=True, mode=0o700)
    return load_settings(state_dir)


def study_ca(settings: CoordinatorSettings) -> tuple[bytes, bytes]:
    """The study CA's (key PEM, certificate PEM); refuses a key file others can read."""
    key_path, cert_path = settings.pki_dir / "ca.key", settings.pki_dir / "ca.pem"
    if not key_path.is_file() or not cert_path.is_file():
        raise FileNotFoundError(f"the study CA is missing in {settings.pki_dir}; run `evoclone coordinator init`")
    return read_secret_file(key_path).encode() + b"\n", cert_path.read_bytes()


def signing_key(settings: CoordinatorSettings) -> Ed25519PrivateKey:
    """The coordinator's Ed25519 signing key (model manifests)."""
    key = serialization.load_pem_private_key(read_secret_file(settings.signing_key_path).encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{settings.signing_key_path} is not an Ed25519 private key; re-run `evoclone coordinator "
                         "init` in a new state directory")
    return key
