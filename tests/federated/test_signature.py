"""Signed model directories: a signature over the canonical manifest covers every byte a site loads."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from evoclone.federated import artifacts
from evoclone.federated.signature import MANIFEST, SIGNATURE, SIGNATURE_FORMAT, SignatureError, canonical_json, \
    key_fingerprint, manifest_digest, sign_manifest, verify_bundle, verify_manifest, verify_model_dir, \
    vocabulary_digest


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def signed_dir(tmp_path):
    """A two-component model directory with a signature.json, and the key that signed it."""
    d = tmp_path / "model"
    g = torch.Generator().manual_seed(0)
    for name, kind in (("predictor", "fusion_predictor"), ("generator", "gpt_twin")):
        artifacts.save_component(d, name, {"w": torch.randn(8, 4, generator=g), "b": torch.zeros(4)}, kind=kind,
                                 config={"d_model": 4, "ratio": 0.1}, vocabulary={"tokens": ["a", "é", "c"]},
                                 extra={"epsilon": 1.25, "sites": [{"name": "site-a", "epsilon": 1.25}]})
    key = Ed25519PrivateKey.generate()
    manifest = json.loads((d / MANIFEST).read_text())
    (d / SIGNATURE).write_text(json.dumps({"format": SIGNATURE_FORMAT, "signature": sign_manifest(key, manifest)}))
    return d, key


def test_canonical_form_and_the_hashes_agree_with_the_model_format(signed_dir):
    d, key = signed_dir
    manifest = json.loads((d / MANIFEST).read_text())
    canonical = canonical_json(manifest)
    assert b" " not in canonical and b"\n" not in canonical and canonical.isascii()
    assert json.loads(canonical) == manifest and canonical_json(json.loads(canonical)) == canonical
    assert manifest_digest(manifest) == __import__("hashlib").sha256(canonical).hexdigest()
    entry = manifest["components"]["predictor"]
    assert vocabulary_digest(json.loads((d / entry["vocabulary"]).read_text())) == entry["vocabulary_hash"]
    assert vocabulary_digest({"tokens": ["a", "é", "c"]}) == artifacts.vocabulary_hash({"tokens": ["a", "é", "c"]})
    assert key_fingerprint(key) == key_fingerprint(_pem(key)) == key_fingerprint(_pem(key).decode())
    assert key_fingerprint(key).startswith("sha256:") and len(key_fingerprint(key)) == 71


def test_a_signed_directory_verifies_and_still_loads(signed_dir):
    d, key = signed_dir
    manifest = verify_model_dir(d, public_key_pem=_pem(key))
    assert sorted(manifest["components"]) == ["generator", "predictor"]
    signature = json.loads((d / SIGNATURE).read_text())["signature"]
    (d / SIGNATURE).unlink()
    with pytest.raises(SignatureError, match="no signature.json and no signature given"):
        verify_model_dir(d, public_key_pem=_pem(key))
    assert verify_model_dir(d, public_key_pem=_pem(key), signature_hex=signature,
                            expected_digest=manifest_digest(manifest)) == manifest
    with pytest.raises(SignatureError, match="is not the expected"):
        verify_model_dir(d, public_key_pem=_pem(key), signature_hex=signature, expected_digest="0" * 64)
    artifacts.load_component(d, "predictor")


@pytest.mark.parametrize("target", ["predictor.safetensors", "generator.safetensors", "predictor.vocab.json"])
def test_a_changed_byte_anywhere_in_a_file_is_caught(signed_dir, target):
    d, key = signed_dir
    original = (d / target).read_bytes()
    for pos in (0, len(original) // 2, len(original) - 2):
        data = bytearray(original)
        data[pos] ^= 0x01
        (d / target).write_bytes(bytes(data))
        with pytest.raises(SignatureError, match=rf"{target}: its (sha256|vocabulary hash) differs from the signed"):
            verify_model_dir(d, public_key_pem=_pem(key))
    (d / target).write_bytes(original)
    verify_model_dir(d, public_key_pem=_pem(key))
    (d / target).unlink()
    with pytest.raises(SignatureError, match=f"{target}: missing"):
        verify_model_dir(d, public_key_pem=_pem(key))


def test_a_tampered_manifest_or_signature_or_another_key_is_refused(signed_dir):
    d, key = signed_dir
    raw = (d / MANIFEST).read_text()
    manifest = json.loads(raw)
    for change in (lambda m: m["components"]["predictor"].update(epsilon=0.1),
                   lambda m: m["components"]["generator"].update(sha256="0" * 64),
                   lambda m: m["components"]["predictor"]["config"].update(ratio=0.10000001),
                   lambda m: m.pop("created_at")):
        tampered = json.loads(raw)
        change(tampered)
        (d / MANIFEST).write_text(json.dumps(tampered))
        with pytest.raises(SignatureError, match="signature does not verify with key sha256:"):
            verify_model_dir(d, public_key_pem=_pem(key))
    # the same document re-serialised (indentation, key order) still verifies: the canonical form is signed
    (d / MANIFEST).write_text(json.dumps(manifest, indent=4, sort_keys=False))
    verify_model_dir(d, public_key_pem=_pem(key))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_model_dir(d, public_key_pem=_pem(Ed25519PrivateKey.generate()))
    sig = json.loads((d / SIGNATURE).read_text())
    flipped = sig["signature"][:-1] + ("0" if sig["signature"][-1] != "0" else "1")
    (d / SIGNATURE).write_text(json.dumps({**sig, "signature": flipped}))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_model_dir(d, public_key_pem=_pem(key))
    with pytest.raises(SignatureError, match="not hex"):
        verify_manifest(manifest, public_key_pem=_pem(key), signature_hex="zz")
    with pytest.raises(SignatureError, match="not a PEM public key"):
        verify_manifest(manifest, public_key_pem=b"nonsense", signature_hex="00")
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(SignatureError, match="not an Ed25519 key"):
        verify_manifest(manifest, public_key_pem=ec_pem, signature_hex="00")


def test_file_names_in_a_signed_manifest_cannot_escape_the_directory(tmp_path):
    key = Ed25519PrivateKey.generate()
    manifest = {"format": "evoclone-model/2", "components": {"predictor": {
        "kind": "x", "weights": "../outside.safetensors", "sha256": "0" * 64, "vocabulary": "v.json",
        "vocabulary_hash": "0" * 64}}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SignatureError, match="weights must be a plain file name"):
        verify_model_dir(tmp_path, public_key_pem=_pem(key), signature_hex=sign_manifest(key, manifest))


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_bundles_are_verified_in_memory_before_unpacking(signed_dir):
    d, key = signed_dir
    members = {p.name: p.read_bytes() for p in d.iterdir()}
    manifest = verify_bundle(_tar(members), public_key_pem=_pem(key))
    assert manifest == json.loads(members[MANIFEST])
    weights = bytearray(members["predictor.safetensors"])
    weights[-3] ^= 0x80
    with pytest.raises(SignatureError, match="predictor.safetensors: its sha256 differs"):
        verify_bundle(_tar({**members, "predictor.safetensors": bytes(weights)}), public_key_pem=_pem(key))
    with pytest.raises(SignatureError, match="holds files the manifest does not name"):
        verify_bundle(_tar({**members, "extra.py": b"print()"}), public_key_pem=_pem(key))
    with pytest.raises(SignatureError, match="not a plain, unique file"):
        verify_bundle(_tar({**members, "../evil": b"x"}), public_key_pem=_pem(key))
    with pytest.raises(SignatureError, match="lacks generator.safetensors"):
        verify_bundle(_tar({k: v for k, v in members.items() if k != "generator.safetensors"}),
                      public_key_pem=_pem(key))
    with pytest.raises(SignatureError, match="no signature.json"):
        verify_bundle(_tar({k: v for k, v in members.items() if k != SIGNATURE}), public_key_pem=_pem(key))
    with pytest.raises(SignatureError, match="not a tar archive"):
        verify_bundle(b"not a tar at all" * 100, public_key_pem=_pem(key))
