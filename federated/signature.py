"""Signed model directories: the coordinator signs a manifest, a site verifies it before loading.

The signature is Ed25519 over the manifest's canonical JSON (sorted keys, no whitespace,
ASCII), which records every weight file's sha256 and every vocabulary's hash, so checking
the signature and then each file against the manifest covers every byte a site loads.
Pure: nothing here reads more than the model directory or bytes it is given.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST = "manifest.json"  # same name as federated.artifacts.MANIFEST (kept apart: no torch import here)
SIGNATURE = "signature.json"
SIGNATURE_FORMAT = "evoclone-signature/1"
ALGORITHM = "Ed25519"
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class SignatureError(ValueError):
    """A model directory or bundle does not match its signature, its manifest or the trusted key."""


def canonical_json(doc: Any) -> bytes:
    """The canonical bytes of a JSON document: sorted keys, no whitespace, ASCII only."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def manifest_digest(manifest: dict) -> str:
    """Hex sha256 of a manifest's canonical JSON."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def vocabulary_digest(vocabulary: Any) -> str:
    """The vocabulary hash the manifest records (sha256 of its canonical JSON, sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(vocabulary, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_public_key(public_key_pem: bytes | str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM; SignatureError for anything else."""
    data = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SignatureError("the trusted public key is not a PEM public key; fetch it from "
                             "GET /api/v1/registry/public-key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("the trusted public key is not an Ed25519 key; fetch it from "
                             "GET /api/v1/registry/public-key")
    return key


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey | bytes | str) -> str:
    """`sha256:<hex>` of the raw 32-byte public key (from a key object or a public PEM)."""
    if isinstance(key, (bytes, str)):
        key = load_public_key(key)
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def sign_manifest(key: Ed25519PrivateKey, manifest: dict) -> str:
    """Hex Ed25519 signature of the manifest's canonical JSON."""
    return key.sign(canonical_json(manifest)).hex()


def manifest_files(manifest: dict) -> dict[str, tuple[str, str]]:
    """Every file a manifest names: {name: ("sha256" | "vocabulary", expected hash)}; SignatureError if malformed."""
    comps = manifest.get("components") if isinstance(manifest, dict) else None
    if not isinstance(comps, dict) or not comps:
        raise SignatureError("the manifest lists no components; it is not a model manifest")
    files: dict[str, tuple[str, str]] = {}
    for name, entry in comps.items():
        if not isinstance(entry, dict):
            raise SignatureError(f"manifest component {name!r} is not an object")
        for field, check, hash_field in (("weights", "sha256", "sha256"),
                                         ("vocabulary", "vocabulary", "vocabulary_hash")):
            fname, digest = entry.get(field), entry.get(hash_field)
            if not isinstance(fname, str) or not FILE_NAME.match(fname) or fname in (MANIFEST, SIGNATURE):
                raise SignatureError(f"manifest component {name!r}: {field} must be a plain file name, got {fname!r}")
            if not isinstance(digest, str) or not _HEX64.match(digest):
                raise SignatureError(f"manifest component {name!r}: {hash_field} must be 64 hex digits")
            if fname in files:
                raise SignatureError(f"manifest names the file {fname!r} twice")
            files[fname] = (check, digest)
    return files


def check_file(name: str, data: bytes, check: str, expected: str) -> None:
    """Compare one file's bytes with the hash the manifest records; SignatureError on a difference."""
    if check == "sha256":
        ok = hashlib.sha256(data).hexdigest() == expected
    else:
        try:
            ok = vocabulary_digest(json.loads(data)) == expected
        except (ValueError, UnicodeDecodeError):
            ok = False
    if not ok:
        what = "sha256" if check == "sha256" else "vocabulary hash"
        raise SignatureError(f"{name}: its {what} differs from the signed manifest; the file was altered, "
                             "download the model again")


def verify_manifest(manifest: dict, *, public_key_pem: bytes | str, signature_hex: str,
                    expected_digest: str | None = None) -> str:
    """Verify the Ed25519 signature of a manifest; returns its digest. SignatureError when it does not verify."""
    key = load_public_key(public_key_pem)
    try:
        signature = bytes.fromhex(signature_hex)
    except (TypeError, ValueError):
        raise SignatureError("the signature is not hex; download the model again") from None
    try:
        key.verify(signature, canonical_json(manifest))
    except InvalidSignature:
        raise SignatureError(f"the manifest's signature does not verify with key {key_fingerprint(key)}: the manifest "
                             "was altered or signed by another key; do not load this model") from None
    digest = manifest_digest(manifest)
    if expected_digest is not None and digest != expected_digest:
        raise SignatureError(f"the manifest digest {digest[:12]} is not the expected {expected_digest[:12]}: this is "
                             "another model version; download the version the coordinator assigned")
    return digest


def _signature_doc(raw: bytes, where: str) -> dict:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SignatureError(f"{where}: not valid JSON; download the model again") from None
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT or not isinstance(doc.get("signature"), str):
        raise SignatureError(f"{where}: not an {SIGNATURE_FORMAT} document; download the model again")
    return doc


def _manifest_of(raw: bytes, where: str) -> dict:
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SignatureError(f"{where}: the manifest is not valid JSON; download the model again") from None
    if not isinstance(manifest, dict):
        raise SignatureError(f"{where}: the manifest is not a JSON object; download the model again")
    return manifest


def verify_model_dir(model_dir: Path, *, public_key_pem: bytes | str, signature_hex: str | None = None,
                     expected_digest: str | None = None) -> dict:
    """Check a model directory against its signed manifest before loading it; returns the manifest.

    Without `signature_hex` the signature comes from the directory's signature.json (as the
    coordinator's download bundle writes it). SignatureError names the first difference.
    """
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not path.is_file():
        raise SignatureError(f"{model_dir}: no {MANIFEST}; pass the model directory the coordinator's bundle unpacked")
    manifest = _manifest_of(path.read_bytes(), str(path))
    if signature_hex is None:
        sig_path = model_dir / SIGNATURE
        if not sig_path.is_file():
            raise SignatureError(f"{model_dir}: no {SIGNATURE} and no signature given; download the signed bundle")
        signature_hex = _signature_doc(sig_path.read_bytes(), str(sig_path))["signature"]
    verify_manifest(manifest, public_key_pem=public_key_pem, signature_hex=signature_hex,
                    expected_digest=expected_digest)
    for name, (check, expected) in manifest_files(manifest).items():
        file = model_dir / name
        if not file.is_file():
            raise SignatureError(f"{file}: missing; the model directory is incomplete, download it again")
        check_file(str(file), file.read_bytes(), check, expected)
    return manifest


def verify_bundle(bundle: bytes, *, public_key_pem: bytes | str, expected_digest: str | None = None) -> dict:
    """Check a downloaded bundle (tar) in memory before unpacking it; returns the manifest."""
    try:
        with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:") as tar:
            members = {}
            for m in tar.getmembers():
                if not m.isfile() or not FILE_NAME.match(m.name) or m.name in members:
                    raise SignatureError(f"bundle member {m.name!r} is not a plain, unique file; refuse this bundle")
                members[m.name] = tar.extractfile(m).read()
    except tarfile.TarError:
        raise SignatureError("the bundle is not a tar archive; download it again") from None
    for needed in (MANIFEST, SIGNATURE):
        if needed not in members:
            raise SignatureError(f"the bundle has no {needed}; download it again")
    manifest = _manifest_of(members[MANIFEST], f"bundle {MANIFEST}")
    doc = _signature_doc(members[SIGNATURE], f"bundle {SIGNATURE}")
    verify_manifest(manifest, public_key_pem=public_key_pem, signature_hex=doc["signature"],
                    expected_digest=expected_digest)
    files = manifest_files(manifest)
    extra = sorted(set(members) - set(files) - {MANIFEST, SIGNATURE})
    if extra:
        raise SignatureError(f"the bundle holds files the manifest does not name ({', '.join(extra)}); refuse it")
    for name, (check, expected) in files.items():
        if name not in members:
            raise SignatureError(f"the bundle lacks {name}; download it again")
        check_file(name, members[name], check, expected)
    return manifest
