"""The one model directory format: `model.safetensors` + `manifest.json` (with sha256)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .models.fusion import FusionConfig, FusionPredictor

FORMAT = "evoclone-model/1"
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """A model directory is missing, incomplete or was tampered with."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_predictor(directory: Path, model: FusionPredictor | dict[str, torch.Tensor], *,
                   config: FusionConfig, feature_spec: str, extra: dict | None = None) -> dict:
    """Write weights and manifest atomically (manifest last); returns the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    weights = directory / WEIGHTS
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    os.replace(tmp, weights)
    manifest = {
        "format": FORMAT,
        "kind": "fusion_predictor",
        "config": asdict(config),
        "feature_spec": feature_spec,
        "weights": WEIGHTS,
        "sha256": sha256_file(weights),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def read_manifest(directory: Path) -> dict:
    """The manifest of a model directory."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a model directory (no {MANIFEST}); pass the directory a training command wrote")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: unknown model format {manifest.get('format')!r}")
    return manifest


def load_predictor(directory: Path) -> tuple[FusionPredictor, dict]:
    """Load a predictor after checking its weights against the manifest's sha256."""
    manifest = read_manifest(directory)
    weights = directory / manifest["weights"]
    if not weights.is_file() or sha256_file(weights) != manifest["sha256"]:
        raise ArtifactError(f"{weights}: weights missing or sha256 differs from the manifest; the model was altered")
    model = FusionPredictor(FusionConfig(**manifest["config"]))
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    return model, manifest


def update_manifest(directory: Path, **fields) -> dict:
    """Add or replace manifest fields (e.g. metrics known only after evaluation)."""
    manifest = read_manifest(directory)
    manifest.update(fields)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST)
    return manifest
