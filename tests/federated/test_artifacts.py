import json
from dataclasses import asdict

import pytest

from evoclone.federated.artifacts import ArtifactError, load_component, save_component, sha256_file
from evoclone.federated.features import FeatureSpec
from evoclone.federated.models.fusion import FusionConfig
from evoclone.federated.training import build_model


def test_model_directory_roundtrip_and_tamper_detection(tmp_path):
    spec = FeatureSpec()
    cfg = FusionConfig(static_dim=spec.static_dim, visit_dim=spec.visit_dim, d_model=16)
    model = build_model(cfg, seed=3)
    manifest = save_component(tmp_path / "m", "predictor", model.state_dict(), kind="fusion_predictor",
                              config=asdict(cfg), vocabulary=asdict(spec), extra={"round": 2})
    assert manifest["sha256"] == sha256_file(tmp_path / "m" / "predictor.safetensors")
    tensors, m2, vocab = load_component(tmp_path / "m", "predictor")
    assert m2["round"] == 2 and m2["kind"] == "fusion_predictor" and vocab == json.loads(json.dumps(asdict(spec)))
    assert all((a == tensors[k]).all() for k, a in model.state_dict().items())
    weights = tmp_path / "m" / "predictor.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_component(tmp_path / "m", "predictor")
    with pytest.raises(ArtifactError, match="not a model directory"):
        load_component(tmp_path, "predictor")
    json.loads((tmp_path / "m" / "manifest.json").read_text())
