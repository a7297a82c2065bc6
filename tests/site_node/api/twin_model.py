"""A tiny trained model (generator + fusion ensemble) as a coordinator-signed bundle, for the site twin tests."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
import pytest

COVARIATES = ["age", "sex", "bmi", "genotype", "diabetes", "hypertension", "ckd", "prior_mi"]


def train_model_dir(out: Path, *, seed: int = 3) -> Path:
    """Train a small generator and a 2-member fusion ensemble on a simulated cohort (seconds, CPU)."""
    import torch

    from evoclone.federated.artifacts import save_component
    from evoclone.federated.features import FeatureSpec, encode_cohort, split_records
    from evoclone.federated.generator_training import build_generator, encode_records, train_generator
    from evoclone.federated.models.fusion import FusionConfig
    from evoclone.federated.predictor import train_ensemble
    from evoclone.federated.simulator import cohort_records, simulate_cohort
    from evoclone.federated.tokenizer import EventTokenizer
    from evoclone.federated.trainer import TrainConfig
    from evoclone.federated.training import subset

    records = cohort_records(simulate_cohort(patients=160, sites=1, seed=seed))
    split = split_records(records)
    train = [records[i] for i in split["train"]]
    tok = EventTokenizer.fit(train, covariates=COVARIATES, max_len=384)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long simulated timelines are truncated to the context: expected here
        seqs, _ = encode_records(tok, train)
    torch.manual_seed(seed)
    gen = build_generator(tok, size="small", seed=seed)
    train_generator(gen, tok, seqs, TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=seed))
    save_component(out, "generator", gen.state_dict(), kind="twin_generator", config=gen.cfg.to_dict(),
                   vocabulary=tok.to_dict(), extra={"meta": {}})
    spec = FeatureSpec.fit(train, covariates=COVARIATES)
    arrays = encode_cohort(records, spec)
    cfg = FusionConfig(static_dim=spec.static_dim, visit_dim=spec.visit_dim, max_visits=spec.max_visits,
                       endpoint="time_to_event", horizon_days=365.0)
    ens, _ = train_ensemble(cfg, subset(arrays, "train", "time_to_event"), subset(arrays, "val", "time_to_event"),
                            TrainConfig(epochs=2, batch_size=32, lr=1e-3, seed=seed), members=2)
    save_component(out, "predictor", ens.state_tensors(), kind="fusion_ensemble", config=ens.meta(),
                   vocabulary=spec.to_dict(), extra={"risk_definition": "event within 365 days"})
    return out


def public_pem(key: Ed25519PrivateKey) -> bytes:
    """The PEM of a signing key's public half."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def signed_bundle(model_dir: Path, key: Ed25519PrivateKey, *, version: str) -> bytes:
    """The coordinator's download format: the canonical manifest, the files it names, and signature.json."""
    from evoclone.federated.signature import SIGNATURE_FORMAT, canonical_json, manifest_files, sign_manifest

    manifest = json.loads((model_dir / "manifest.json").read_text())
    members = {"manifest.json": canonical_json(manifest)}
    for name in manifest_files(manifest):
        members[name] = (model_dir / name).read_bytes()
    members["signature.json"] = json.dumps({"format": SIGNATURE_FORMAT, "version_id": version,
                                            "signature": sign_manifest(key, manifest)}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The tiny model, trained once per test session."""
    return train_model_dir(tmp_path_factory.mktemp("site-model") / "model")


@pytest.fixture(scope="session")
def coordinator_key() -> Ed25519PrivateKey:
    """The coordinator's signing key of the tests."""
    return Ed25519PrivateKey.generate()


@pytest.fixture
def installed(client, model_dir, coordinator_key) -> str:
    """Install and promote the tiny model at the client's site as version v1 (the key pinned on the way)."""
    from evoclone.site_node.local_models import install_bundle

    install_bundle(engine=client.app.state.engine, site_dir=client.app.state.settings.site_dir,
                   bundle=signed_bundle(model_dir, coordinator_key, version="v1"),
                   public_key_pem=public_pem(coordinator_key))
    return "v1"
