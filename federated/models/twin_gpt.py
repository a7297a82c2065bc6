"""GPT twin generator: a GPT-2 causal language model over event tokens, built from a config.

The network is Hugging Face `transformers`' GPT2LMHeadModel, constructed from a
`GPT2Config` (never downloaded). Position ids are always passed batch-expanded (B, T):
Opacus's per-sample gradient hook for the position embedding needs a batch dimension, and
left-padded prompts need positions that start at each sequence's first real token.
Input and output embeddings are untied so every parameter belongs to exactly one layer,
which per-sample clipping (hooks and ghost) requires.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# size -> (n_embd, n_layer, n_head)
SIZES: dict[str, tuple[int, int, int]] = {"small": (64, 2, 2), "medium": (128, 4, 4), "large": (256, 6, 8)}
IGNORE = -100


@dataclass(frozen=True)
class TwinGPTConfig:
    """Architecture of the generator; `size` picks a preset unless n_embd/n_layer/n_head are given."""

    vocab_size: int
    n_positions: int = 512
    size: str = "small"
    n_embd: int = 0
    n_layer: int = 0
    n_head: int = 0
    dropout: float = 0.0
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {tuple(SIZES)}, got {self.size!r}")
        e, l, h = SIZES[self.size]
        object.__setattr__(self, "n_embd", self.n_embd or e)
        object.__setattr__(self, "n_layer", self.n_layer or l)
        object.__setattr__(self, "n_head", self.n_head or h)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.vocab_size < 8:
            raise ValueError(f"vocab_size {self.vocab_size} is too small for an event vocabulary")

    def to_dict(self) -> dict:
        """JSON-able config (stored in the manifest)."""
        return asdict(self)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Batch-expanded position ids (B, T) counting only real tokens (left padding gets 0)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class TwinGPT(nn.Module):
    """Causal LM over event tokens; forward returns (logits, loss)."""

    def __init__(self, cfg: TwinGPTConfig) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.cfg = cfg
        hf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
                        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=cfg.bos_id,
                        eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id, tie_word_embeddings=False)
        self.lm = GPT2LMHeadModel(hf)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, reduction: str = "mean"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, V); loss: per-sequence mean token NLL, then `reduction` over B."""
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        out = self.lm(input_ids=idx, attention_mask=attention_mask, position_ids=positions(attention_mask),
                      use_cache=False)
        logits = out.logits  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, sequence_nll(logits, targets, reduction=reduction)

    def step(self, idx: torch.Tensor, attention_mask: torch.Tensor, past=None
             ) -> tuple[torch.Tensor, object]:
        """One decoding step with the KV cache: logits of the last position (B, V) and the new cache."""
        pos = positions(attention_mask)[:, -idx.shape[1]:]  # (B, t): positions of the new tokens
        out = self.lm(input_ids=idx, attention_mask=attention_mask, position_ids=pos, cache=past, use_cache=True)
        return out.logits[:, -1, :], out.cache


def sequence_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean next-token NLL per sequence (B,), reduced over the batch unless reduction='none'.

    The privacy unit is the patient, so each sequence contributes one loss term however
    long it is; targets equal to IGNORE (padding) do not count.
    """
    B, T, V = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), targets[:, 1:].reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(B, T - 1)  # (B, T-1)
    valid = (targets[:, 1:] != IGNORE).float()
    per_seq = (nll * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)  # (B,)
    if reduction == "none":
        return per_seq
    return per_seq.mean() if reduction == "mean" else per_seq.sum()
