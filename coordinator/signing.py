"""The coordinator's Ed25519 signature over model manifests, and its public key for sites to pin."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from evoclone.federated.signature import ALGORITHM, canonical_json, key_fingerprint, manifest_digest, sign_manifest

from .settings import CoordinatorSettings
from .state import signing_key


@dataclass(frozen=True)
class Signed:
    """A manifest's canonical bytes, their sha256, the signature and the signing key's fingerprint."""

    canonical: bytes
    digest: str
    signature: str
    key_fingerprint: str


def load_key(settings: CoordinatorSettings) -> Ed25519PrivateKey:
    """The signing key `evoclone coordinator init` created (0600); a clear error when it is missing."""
    if not settings.signing_key_path.is_file():
        raise FileNotFoundError(f"the model signing key {settings.signing_key_path} is missing; run `evoclone "
                                "coordinator init` or restore it from the state directory's backup")
    return signing_key(settings)


def sign(key: Ed25519PrivateKey, manifest: dict) -> Signed:
    """Sign a manifest's canonical JSON (which records every weight file's sha256)."""
    return Signed(canonical=canonical_json(manifest), digest=manifest_digest(manifest),
                  signature=sign_manifest(key, manifest), key_fingerprint=key_fingerprint(key))


def public_key_pem(key: Ed25519PrivateKey) -> str:
    """The public half of `key` as SubjectPublicKeyInfo PEM."""
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def public_key_info(settings: CoordinatorSettings) -> dict[str, str]:
    """What sites pin: algorithm, public key PEM and its fingerprint."""
    key = load_key(settings)
    return {"algorithm": ALGORITHM, "public_key_pem": public_key_pem(key), "fingerprint": key_fingerprint(key)}
