"""The one model directory format, holding a predictor, a generator, or both.

    MODEL_DIR/manifest.json              format, created_at, components{name: {...}}
    MODEL_DIR/<name>.safetensors         weights of one component
    MODEL_DIR/<name>.vocab.json          the feature spec / tokenizer vocabulary it was trained with

Each component entry records kind, config, weights file and sha256, vocabulary file and
its hash, and whatever training adds (epsilon, delta, data fingerprint, metrics).
Loading refuses weights or a vocabulary whose hash differs from the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


FORMAT = "evoclone-model/2"
MANIFEST = "manifest.json"
COMPONENTS = ("predictor", "generator")


class ArtifactError(ValueError):
    """A model directory is missing, incomplete, from another vocabulary or was tampered with."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def vocabulary_hash(vocabulary: dict) -> str:
    """sha256 of a vocabulary document in canonical JSON."""
    return hashlib.sha256(json.dumps(vocabulary, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_component(directory: Path, name: str, tensors: dict[str, torch.Tensor], *, kind: str,
                   config: dict, vocabulary: dict, extra: dict | None = None) -> dict:
    """Write one component's weights and vocabulary, then the manifest (last, atomically).

    Other components already in the directory are kept. Returns the component's entry.
    """
    if name not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {name!r}")
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    tmp = weights.with_name(weights.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, weights)
    vocab_file = directory / f"{name}.vocab.json"
    _write_json(vocab_file, vocabulary)
    entry = {
        "kind": kind,
        "config": config,
        "weights": weights.name,
        "sha256": sha256_file(weights),
        "vocabulary": vocab_file.name,
        "vocabulary_hash": vocabulary_hash(vocabulary),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    manifest = _read_or_new(directory)
    manifest["components"][name] = entry
    _write_json(directory / MANIFEST, manifest)
    return entry


def _read_or_new(directory: Path) -> dict:
    if (directory / MANIFEST).is_file():
        return read_manifest(directory)
    return {"format": FORMAT, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "components": {}}


def read_manifest(directory: Path) -> dict:
    """The manifest of a model directory."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a model directory (no {MANIFEST}); pass the directory a "
                            "training command wrote")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc.msg}); retrain or restore the model directory") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: unknown model format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def component(directory: Path, name: str) -> dict:
    """One component's manifest entry, or a clear error naming what the directory holds."""
    comps = read_manifest(directory)["components"]
    if name not in comps:
        have = ", ".join(sorted(comps)) or "nothing"
        raise ArtifactError(f"{directory} holds no {name} (it holds {have}); train one with "
                            f"`evoclone twins train --model {'fusion' if name == 'predictor' else 'gpt'} --out {directory}`")
    return comps[name]


def load_component(directory: Path, name: str, *, expected_vocabulary_hash: str | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, manifest entry, vocabulary) after checking the weights' and vocabulary's hashes."""
    entry = component(directory, name)
    weights = directory / entry["weights"]
    if not weights.is_file() or sha256_file(weights) != entry["sha256"]:
        raise ArtifactError(f"{weights}: weights missing or sha256 differs from the manifest; the model was "
                            "altered, retrain it or restore the directory")
    vocab_file = directory / entry["vocabulary"]
    try:
        vocabulary = json.loads(vocab_file.read_text())
    except (OSError, json.JSONDecodeError):
        raise ArtifactError(f"{vocab_file}: vocabulary missing or unreadable; restore the model directory") from None
    if vocabulary_hash(vocabulary) != entry["vocabulary_hash"]:
        raise ArtifactError(f"{vocab_file}: vocabulary hash differs from the manifest; the model was altered")
    if expected_vocabulary_hash is not None and entry["vocabulary_hash"] != expected_vocabulary_hash:
        raise ArtifactError(f"{directory}: the {name} was trained with another vocabulary "
                            f"({entry['vocabulary_hash'][:12]}, expected {expected_vocabulary_hash[:12]}); "
                            "use a model trained for this data")
    return load_file(str(weights)), entry, vocabulary


def update_component(directory: Path, name: str, **fields) -> dict:
    """Add or replace fields of one component's entry (e.g. metrics known after evaluation)."""
    manifest = read_manifest(directory)
    if name not in manifest["components"]:
        raise ArtifactError(f"{directory} holds no {name}")
    manifest["components"][name].update(fields)
    _write_json(directory / MANIFEST, manifest)
    return manifest["components"][name]
