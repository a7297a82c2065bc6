"""Load the generator and the fusion ensemble of a model directory (the one format every user of a model reads)."""

from __future__ import annotations

from pathlib import Path

from .artifacts import ArtifactError, load_component


class ModelLoadError(ValueError):
    """A model directory lacks a component, or its files do not fit together (one line: what and where)."""


def load_generator(model_dir: Path):
    """(model, tokenizer, manifest entry) of the directory's twin generator."""
    from .models.twin_gpt import TwinGPT, TwinGPTConfig
    from .tokenizer import EventTokenizer

    try:
        tensors, entry, vocab = load_component(model_dir, "generator")
        tok = EventTokenizer.from_dict(vocab)
    except (ArtifactError, ValueError) as exc:
        raise ModelLoadError(str(exc)) from None
    model = TwinGPT(TwinGPTConfig(**entry["config"]))
    if model.cfg.vocab_size != tok.vocab_size:
        raise ModelLoadError(f"{model_dir}: generator vocabulary size {model.cfg.vocab_size} differs from its "
                             f"vocabulary file ({tok.vocab_size}); the directory mixes two models")
    model.load_state_dict(tensors)
    model.eval()
    return model, tok, entry


def load_ensemble(model_dir: Path):
    """(ensemble, feature spec, manifest entry) of the directory's fusion outcome predictor."""
    from .features import FeatureSpec
    from .predictor import FusionEnsemble

    try:
        tensors, entry, vocab = load_component(model_dir, "predictor")
        if entry["kind"] != "fusion_ensemble":
            raise ModelLoadError(f"{model_dir}: the predictor is a {entry['kind']}, not one trained by "
                                 "`evoclone twins train --model fusion`")
        return FusionEnsemble.from_state(entry["config"], tensors), FeatureSpec.from_dict(vocab), entry
    except (ArtifactError, ValueError) as exc:
        raise ModelLoadError(str(exc)) from None
