"""Micro-benchmarks of the optimisations kept for issue 8, each against the plain computation it replaces.

    python benchmarks/optim_bench.py --json benchmarks/results/optim_bench.json

1. AdamW step over SmolLM2-135M's parameters: torch's foreach implementation vs the fused kernel
   (`training.adamw`), random gradients, mean of 3 steps after one warm-up step.
2. LM head + log-probs of 2,048 target tokens (SmolLM2's hidden size and vocabulary) under bf16 autocast, forward
   and backward: the plain (N, V) logits with cross-entropy vs `core.lm.target_logps` (chunks of 1,024 rows).
   Timed separately, with the bytes autograd keeps for the backward (saved-tensor hooks).
3. Elo: one Bradley–Terry fit and a 1,000-resample bootstrap on 5 models × 10 pairs × 200 prompts of games.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time

import torch
import torch.nn.functional as F

from rlhfkit import models
from rlhfkit.core.lm import target_logps
from rlhfkit.core.losses import elo_bootstrap, elo_ratings
from rlhfkit.training import RunConfig, adamw


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def adamw_bench() -> dict:
    lm = models.load_causal_lm("smollm2-135m", tokenizer=models.load_tokenizer("smollm2-135m"))
    params = list(lm.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    foreach = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), foreach=True)
    fused = adamw(params, RunConfig(lr=1e-5))
    return {"params": sum(p.numel() for p in params), "foreach_s": timed(foreach.step), "fused_s": timed(fused.step)}


def head_bench(n: int = 2048, hidden: int = 576, vocab: int = 49152) -> dict:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=gen).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=gen)
    out = {}
    for name, fn in (("plain", lambda: -F.cross_entropy(F.linear(h, w).float(), t, reduction="none")),
                     ("chunked", lambda: target_logps(h, w, t))):
        kept = []

        def pack(x):
            kept.append(x.numel() * x.element_size())
            return x

        def step():
            kept.clear()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), \
                    torch.autocast("cpu", dtype=torch.bfloat16):
                logps = fn()
            logps.sum().backward()
            h.grad = w.grad = None

        out[f"{name}_s"] = timed(step)
        out[f"{name}_kept_mb"] = sum(kept) / 2**20
    return out


def elo_bench() -> dict:
    rng = random.Random(0)
    names = ["base", "sft", "best-of-16", "dpo", "ppo"]
    games = [(a, b, rng.choice([0.0, 0.5, 1.0])) for a, b in itertools.combinations(names, 2) for _ in range(200)]
    return {"games": len(games), "fit_s": timed(lambda: elo_ratings(games)),
            "bootstrap_1000_s": timed(lambda: elo_bootstrap(games, n=1000), repeat=1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = {"threads": torch.get_num_threads(), "adamw": adamw_bench(), "lm_head": head_bench(),
              "elo": elo_bench()}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
