"""Sampling twins from the GPT generator: batched, KV-cached, grammar-constrained.

Prompts (a patient's baseline, history and the chosen arm) are left-padded into one
batch; each step samples the next token of every sequence with temperature and nucleus
(top-p) sampling restricted to the grammar's allowed set, and feeds only the new token
through the model thanks to the key/value cache. `use_cache=False` recomputes the whole
prefix every step (the baseline the benchmark compares against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .grammar import Constraints, FutureGrammar
from .models.twin_gpt import IGNORE, TwinGPT
from .tokenizer import EventTokenizer


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample: temperature, nucleus mass, budget, batching, cache and seed."""

    temperature: float = 1.0
    top_p: float = 0.95
    max_new: int = 320
    batch_size: int = 64
    use_cache: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1 or self.max_new < 3:
            raise ValueError("batch_size must be >= 1 and max_new >= 3")


def _pick(logits: torch.Tensor, allowed: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """Sample one token per row (B,) from the allowed tokens with temperature and top-p."""
    logits = logits.float().masked_fill(~allowed, float("-inf")) / cfg.temperature  # (B, V)
    probs = logits.softmax(dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        drop = (cum - sorted_p) >= cfg.top_p  # keep the smallest prefix reaching top_p (always the first)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def sample(model: TwinGPT, tok: EventTokenizer, prompts: list[list[int]], cfg: SamplingConfig, *,
           constraints: list[Constraints] | None = None,
           on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Generate the future (tokens after each prompt, ending in <eos>) for every prompt, in order."""
    model.eval()
    if constraints is not None and len(constraints) != len(prompts):
        raise ValueError("constraints must have one entry per prompt")
    device = next(model.parameters()).device
    out: list[list[int]] = []
    n_pos = model.cfg.n_positions
    for b0 in range(0, len(prompts), cfg.batch_size):
        batch = prompts[b0:b0 + cfg.batch_size]
        cons = constraints[b0:b0 + cfg.batch_size] if constraints is not None else [Constraints()] * len(batch)
        grammars = []
        for p, c in zip(batch, cons):
            room = min(cfg.max_new, n_pos - len(p))
            if room < 3:
                raise ValueError(f"prompt of {len(p)} tokens leaves no room to generate in a context of "
                                 f"{n_pos}; lower the tokenizer's prompt_budget or train a longer context")
            grammars.append(FutureGrammar(tok, max_new=room, constraints=c))
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + b0)
        B, L = len(batch), max(map(len, batch))
        ids = torch.full((B, L), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding keeps every sequence's last token at the end
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        if cfg.use_cache:
            logits, cache = model.step(ids, mask)
        else:
            logits = model(ids, attention_mask=mask)[0][:, -1]
        futures: list[list[int]] = [[] for _ in batch]
        for _ in range(max(g.max_new for g in grammars)):
            allowed = torch.from_numpy(np.stack([g.allowed() for g in grammars])).to(device)
            nxt = _pick(logits, allowed, cfg, gen)
            live = False
            picked = nxt.tolist()  # one device-to-host copy per step, not one per sequence
            for i, g in enumerate(grammars):
                if g.phase == "done":
                    continue
                t = picked[i]
                g.advance(t)
                futures[i].append(t)
                live = live or g.phase != "done"
            if not live:
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
            if cfg.use_cache:
                logits, cache = model.step(nxt[:, None], mask, cache)
            else:
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                logits = model(ids, attention_mask=mask)[0][:, -1]
        out.extend(futures)
        if on_batch is not None:
            on_batch(len(batch))
    return out


@torch.no_grad()
def sequence_nlls(model: TwinGPT, sequences: list[list[int]], *, pad_id: int, batch_size: int = 64) -> np.ndarray:
    """Mean next-token NLL of each full sequence (for likelihood membership-inference tests)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for b0 in range(0, len(sequences), batch_size):
        batch = sequences[b0:b0 + batch_size]
        L = max(map(len, batch))
        ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(batch):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        targets = ids.masked_fill(mask == 0, IGNORE)
        _, nll = model(ids.to(device), targets.to(device), mask.to(device), reduction="none")
        out.append(nll.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
