"""Benchmark the GPT twin generator: DP-SGD step time against the non-DP step, and generation speed.

Data: a simulated cohort (`simulate_cohort`), tokenized with `EventTokenizer.fit` on the
training split and right-padded to the longest sequence (the fixed step length).

1. Training step. For each size, one randomly initialised model is copied into a plain
   copy (AdamW) and one copy per DP mode (hooks: stock Opacus hooks; hooks-fused: what
   `trainer.fit` runs, hooks plus `dp_layers.fuse_clipping` and `dp_layers.use_output_hooks`;
   ghost), wrapped by Opacus's PrivacyEngine (rules from `dp_layers`, Poisson loader, ghost
   criterion).
   Every step uses the same fixed batch (Poisson sampling would change the
   batch size from step to step; the question is the per-step cost of per-sample clipping
   and noise). After warm-up the modes alternate step by step, so machine load drift hits
   them alike; the table gives medians and the ratio to the non-DP median (target <= 1.5).
2. Generation. The same held-out prompts (each patient under both arms) are sampled with
   `generation.sample`: batched with the KV cache (batch 64) against one sequence at a time
   recomputing the whole prefix (no cache), same max_new; tokens/s and the speedup
   (target >= 10). The model is the plain copy after its timed steps, trained (untimed, no
   DP) for `--gen-epochs` more epochs so futures have realistic lengths. tokens/s is
   compared with the arithmetic bound: peak float32 FLOP/s of a large matmul measured in this run divided by the
   FLOPs per generated token, F = 2 * P_matmul + 4 * n_layer * n_embd * T_ctx, where
   P_matmul counts the weights used in matmuls (blocks and LM head; not the embedding
   tables, which are lookups) and T_ctx is the mean attended context (prompt + half the
   future); the attention term is QK^T and AV over that context.

    .venv/bin/python benchmarks/bench_twin_gpt.py [--sizes small,medium] [--batch 32] [--steps 20]
        [--device cpu|cuda|auto] [--threads 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
import warnings
from datetime import date

import numpy as np
import torch

from evoclone.federated.features import split_of
from evoclone.federated.generation import SamplingConfig, sample
from evoclone.federated.generator_training import build_generator, encode_records, generator_loss, to_dataset
from evoclone.federated.record import Arm
from evoclone.federated.simulator import cohort_records, simulate_cohort
from evoclone.federated.tokenizer import EventTokenizer

COVARIATES = ["age", "sex", "bmi", "genotype", "diabetes", "hypertension", "ckd", "prior_mi"]
STEP_TARGET, GEN_TARGET = 1.5, 10.0


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cohort_data(patients: int, seed: int, n_prompts: int):
    """Tokenizer, training sequences and held-out prompts (each patient under both arms)."""
    recs = cohort_records(simulate_cohort(patients=patients, sites=3, seed=seed))
    train = [r for r in recs if split_of(r.patient_id) == 0]
    test = [r for r in recs if split_of(r.patient_id) != 0][:max(1, n_prompts // 2)]
    tok = EventTokenizer.fit(train, covariates=COVARIATES)
    seqs, _ = encode_records(tok, train)
    prompts = [tok.encode(r, arm=a, with_future=False).ids for r in test for a in (Arm.CONTROL, Arm.TREATMENT)]
    return tok, seqs, prompts[:n_prompts]


def peak_flops(device: torch.device, n: int, reps: int = 5) -> float:
    """Best float32 FLOP/s of an n x n matmul (the machine's achievable arithmetic rate)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


class _PerExample(torch.nn.Module):
    """Ghost-clipping criterion: the loss function already returns per-example losses (as in trainer)."""

    reduction = "mean"

    def forward(self, per_example: torch.Tensor, _target=None) -> torch.Tensor:
        return per_example


def make_private(model, loader, mode: str, device: torch.device):
    """(module, optimizer, criterion) wrapped as trainer._fit_private wraps them."""
    from opacus import PrivacyEngine

    from evoclone.federated.dp_layers import fuse_clipping, register_grad_samplers, use_output_hooks

    register_grad_samplers()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    kwargs = {"criterion": _PerExample()} if mode == "ghost" else {}
    made = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=True, grad_sample_mode=mode.removesuffix("-fused"),
        noise_generator=torch.Generator(device=device).manual_seed(1), **kwargs)
    if mode.endswith("-fused"):  # what trainer.fit runs: fused clipping and output hooks
        if not fuse_clipping(made[1]):
            raise ValueError(f"mode {mode}: only the hooks optimizer can fuse its clipping")
        use_output_hooks(made[0])
    return (made[0], made[1], made[2]) if len(made) == 4 else (made[0], made[1], None)


def functorch_layers(model) -> list[str]:
    """Layer types with parameters that Opacus has no rule for (it would fall back to functorch)."""
    from opacus.grad_sample import GradSampleModule

    return sorted({type(m).__name__ for m in model.modules() if any(p.requires_grad for p in
                   m.parameters(recurse=False)) and type(m) not in GradSampleModule.GRAD_SAMPLERS})


def train_step(module, opt, criterion, batch) -> None:
    """One optimiser step on the batch, as trainer._loop takes it."""
    opt.zero_grad()
    loss = criterion(generator_loss(module, batch, reduction="none"), None) if criterion is not None \
        else generator_loss(module, batch)
    loss.backward()
    opt.step()


def bench_steps(tok, seqs, size: str, args, device: torch.device):
    """Median step times per mode (non-DP first) and the trained plain model."""
    ds = to_dataset(seqs, pad_id=tok.pad_id)
    batch = [t[:args.batch].to(device) for t in ds.tensors]  # (B, T) ids and mask, T = padded length
    base = build_generator(tok, size=size).to(device)
    plain = copy.deepcopy(base)
    runners = {"non-DP": (plain, torch.optim.AdamW(plain.parameters(), lr=3e-3), None)}
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch)
    for mode in args.modes.split(","):
        runners[f"DP {mode}"] = make_private(copy.deepcopy(base), loader, mode, device)
    for module, _, _ in runners.values():
        module.train()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(args.warmup + args.steps):
        for name, (module, opt, crit) in runners.items():  # alternate: load drift hits every mode alike
            sync(device)
            t = time.perf_counter()
            train_step(module, opt, crit, batch)
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    base_ms = 1e3 * float(np.median(times["non-DP"]))
    rows = [{"size": size, "params": sum(p.numel() for p in base.parameters()), "mode": name,
             "seq_len": int(batch[0].shape[1]), "batch": args.batch,
             "median_ms": 1e3 * float(np.median(t)), "p90_ms": 1e3 * float(np.percentile(t, 90)),
             "ratio": 1e3 * float(np.median(t)) / base_ms, "steps": len(t)} for name, t in times.items()]
    rows[0]["functorch_layers"] = functorch_layers(base)
    return rows, plain


def train_more(model, ds, args, device: torch.device) -> None:
    """A few plain epochs (untimed) so sampled futures have realistic lengths; batches moved to the device."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.gen_epochs):
        order = torch.randperm(len(ds), generator=gen)
        for b0 in range(0, len(order), args.batch):
            train_step(model, opt, None, [t[order[b0:b0 + args.batch]].to(device) for t in ds.tensors])
    model.eval()


def flops_per_token(model, ctx: float) -> float:
    """2 * matmul weights + QK^T and AV over the attended context (see the module docstring)."""
    c = model.cfg
    lookups = model.lm.transformer.wte.weight.numel() + model.lm.transformer.wpe.weight.numel()
    p_matmul = sum(p.numel() for p in model.parameters() if p.dim() == 2) - lookups
    return 2 * p_matmul + 4 * c.n_layer * c.n_embd * ctx


def bench_generation(model, tok, prompts, size: str, args, device: torch.device, peak: float):
    """Batched KV-cache sampling against one-at-a-time sampling without cache, same prompts."""
    rows = []
    for label, cfg in (("batched KV cache", SamplingConfig(max_new=args.max_new, batch_size=args.gen_batch)),
                       ("one at a time, no cache", SamplingConfig(max_new=args.max_new, batch_size=1,
                                                                  use_cache=False))):
        sample(model, tok, prompts[:2], SamplingConfig(max_new=8, batch_size=cfg.batch_size,
                                                       use_cache=cfg.use_cache))  # warm-up
        sync(device)
        t = time.perf_counter()
        futures = sample(model, tok, prompts, cfg)
        sync(device)
        secs = time.perf_counter() - t
        n_tok = sum(map(len, futures))
        ctx = float(np.mean([len(p) + len(f) / 2 for p, f in zip(prompts, futures)]))
        bound = peak / flops_per_token(model, ctx)
        rows.append({"size": size, "mode": label, "prompts": len(prompts), "tokens": n_tok, "seconds": secs,
                     "tokens_per_s": n_tok / secs, "mean_future": n_tok / len(prompts), "ctx": ctx,
                     "flops_per_token": flops_per_token(model, ctx), "bound_tokens_per_s": bound,
                     "pct_of_bound": 100 * n_tok / secs / bound})
    rows[0]["speedup"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    rows[1]["speedup"] = 1.0
    return rows


def print_tables(step_rows, gen_rows, peak: float, head: str) -> None:
    """The two tables, targets marked."""
    print(head)
    print(f"\nDP training step (same model, same fixed batch; ratio target <= {STEP_TARGET})")
    print(f"{'size':<8}{'params':>9}{'mode':>16}{'T':>5}{'B':>4}{'median ms':>11}{'p90 ms':>9}{'x non-DP':>10}"
          f"{'target':>8}{'steps':>7}")
    for r in step_rows:
        ok = "" if r["mode"] == "non-DP" else ("ok" if r["ratio"] <= STEP_TARGET else "MISS")
        print(f"{r['size']:<8}{r['params']:>9,}{r['mode']:>16}{r['seq_len']:>5}{r['batch']:>4}{r['median_ms']:>11.1f}"
              f"{r['p90_ms']:>9.1f}{r['ratio']:>10.2f}{ok:>8}{r['steps']:>7}")
    fallbacks = sorted({n for r in step_rows for n in r.get("functorch_layers", [])})
    print(f"functorch fallbacks: {', '.join(fallbacks) or 'none (every trainable layer has an Opacus rule)'}")
    if not gen_rows:
        return
    print(f"\nGeneration (speedup target >= {GEN_TARGET}); peak float32 matmul {peak / 1e9:.1f} GFLOP/s; "
          "bound = peak / (2 P_matmul + 4 n_layer d T_ctx)")
    print(f"{'size':<8}{'mode':>25}{'prompts':>8}{'tokens':>8}{'s':>8}{'tok/s':>10}{'speedup':>9}{'target':>7}"
          f"{'MFLOP/tok':>10}{'bound tok/s':>13}{'% bound':>9}")
    for r in gen_rows:
        ok = "" if r["speedup"] == 1.0 else ("ok" if r["speedup"] >= GEN_TARGET else "MISS")
        print(f"{r['size']:<8}{r['mode']:>25}{r['prompts']:>8}{r['tokens']:>8}{r['seconds']:>8.2f}"
              f"{r['tokens_per_s']:>10.0f}{r['speedup']:>9.1f}{ok:>7}{r['flops_per_token'] / 1e6:>10.2f}"
              f"{r['bound_tokens_per_s']:>13,.0f}{r['pct_of_bound']:>9.3g}")


def main() -> None:
    """Parse arguments, run both measurements per size, print the tables (and write JSON)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--batch", type=int, default=32, help="training batch (fixed, taken from the dataset)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="hooks,hooks-fused,ghost",
                    help="Opacus grad_sample_mode values to time; hooks-fused: as trainer.fit runs it (dp_layers.fuse_clipping and use_output_hooks)")
    ap.add_argument("--patients", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts (patients x both arms)")
    ap.add_argument("--max-new", type=int, default=160)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--gen-epochs", type=int, default=3, help="plain epochs before sampling (untimed)")
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--matmul", type=int, default=0, help="matmul size for the peak (default 2048 cpu, 8192 cuda)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when available)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
    warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
    tok, seqs, prompts = cohort_data(args.patients, args.seed, args.prompts)
    peak = peak_flops(device, args.matmul or (8192 if device.type == "cuda" else 2048))
    step_rows, gen_rows = [], []
    for size in args.sizes.split(","):
        rows, model = bench_steps(tok, seqs, size, args, device)
        step_rows += rows
        if not args.no_generation:
            train_more(model, to_dataset(seqs, pad_id=tok.pad_id), args, device)
            try:
                gen_rows += bench_generation(model, tok, prompts, size, args, device, peak)
            except RuntimeError as e:  # e.g. sampling code that is not device-aware yet
                print(f"generation on {device} failed for size {size}: {e}", file=sys.stderr)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s)"
    head = (f"GPT twin generator, {args.patients}-patient simulated cohort ({len(seqs)} training sequences, "
            f"vocabulary {tok.vocab_size}); {date.today()} on {platform.node()}, {where}; torch {torch.__version__}")
    print_tables(step_rows, gen_rows, peak, head)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "machine": head, "peak_flops": peak, "steps": step_rows,
                       "generation": gen_rows}, f, indent=1)


if __name__ == "__main__":
    main()
