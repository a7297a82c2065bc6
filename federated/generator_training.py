"""Training the GPT twin generator on tokenized timelines, with or without DP, through `trainer.fit`."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .generation import sequence_nlls
from .models.twin_gpt import IGNORE, TwinGPT, TwinGPTConfig
from .record import PatientRecord
from .tokenizer import EventTokenizer
from .trainer import DPSettings, TrainConfig, TrainResult, fit


def encode_records(tok: EventTokenizer, records: list[PatientRecord], *, meta: dict[str, str] | None = None
                   ) -> tuple[list[list[int]], dict]:
    """Token sequences of records that have an arm, plus counts of truncation and unknown tokens."""
    seqs, unknown, truncated, skipped = [], Counter(), 0, 0
    for r in records:
        if r.arm is None:
            skipped += 1
            continue
        e = tok.encode(r, meta=meta)
        seqs.append(e.ids)
        unknown += e.unknown
        truncated += e.truncated_visits > 0
    if truncated:
        warnings.warn(f"{truncated} patients had timelines longer than the context ({tok.spec.max_len} tokens); "
                      "their oldest history (and latest follow-up) visits were left out", stacklevel=2)
    return seqs, {"unknown": dict(unknown), "truncated": truncated, "without_arm": skipped}


def to_dataset(seqs: list[list[int]], *, pad_id: int, length: int | None = None) -> TensorDataset:
    """Right-padded (ids, attention mask) tensors."""
    L = length or max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s[:L])
        mask[i, :len(s)] = 1
    return TensorDataset(ids, mask)


def generator_loss(model: torch.nn.Module, batch: list[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Per-patient mean token NLL (the loss trainer.fit and Opacus need)."""
    ids, mask = batch
    _, loss = model(ids, ids.masked_fill(mask == 0, IGNORE), mask, reduction=reduction)
    return loss


def build_generator(tok: EventTokenizer, *, size: str = "small", seed: int = 0, dropout: float = 0.0,
                    **overrides) -> TwinGPT:
    """A fresh generator sized for the tokenizer's vocabulary and context."""
    torch.manual_seed(seed)
    cfg = TwinGPTConfig(vocab_size=tok.vocab_size, n_positions=tok.spec.max_len, size=size, dropout=dropout,
                        pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id, **overrides)
    return TwinGPT(cfg)


def train_generator(model: TwinGPT, tok: EventTokenizer, train: list[list[int]], cfg: TrainConfig, *,
                    dp: DPSettings | None = None, on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Fit the generator on token sequences; the same loop with or without DP."""
    return fit(model, to_dataset(train, pad_id=tok.pad_id), cfg, loss_fn=generator_loss, dp=dp, on_step=on_step)


def perplexity(model: TwinGPT, seqs: list[list[int]], *, pad_id: int) -> float:
    """exp of the mean per-patient token NLL."""
    return float(np.exp(np.mean(sequence_nlls(model, seqs, pad_id=pad_id)))) if seqs else float("nan")
