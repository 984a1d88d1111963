"""Frozen models under bf16 autocast, A/B in one process: fp32 weights (autocast casts every weight at every call)
against the blocks' Linear weights stored in bf16 (`models.inference_weights`). On a pipeline run's models:

- score: `RewardModel.score` of the run's first N best-of-16 samples (default 640: 40 prompts × 16; 3200 is the
  best-of-n stage's whole call), batch 256
- logps: `evaluation.response_logps` of 200 samples of the PPO policy under the SFT model (PPO's and the
  evaluation's reference pass), batch 256

The two variants alternate (A B, B A, ...) so that a slow phase of the machine hits both; prints every time, the
medians, and whether the outputs are the same bits (they must be).

    python benchmarks/inference_weights_bench.py runs/pipeline-s11 6 [640]     # RUN REPEATS [N]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rlhfkit import models
from rlhfkit.evaluate.evaluation import response_logps
from rlhfkit.rewards import RewardModel
from rlhfkit.rollout import SamplingParams
from rlhfkit.rollout.hf import HFEngine

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/pipeline-s11")
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 6
n_score = int(sys.argv[3]) if len(sys.argv) > 3 else 640

rows = [json.loads(line) for line in (run / "best_of_n" / "samples.jsonl").open()][:n_score]
prompts, texts = [r["prompt"] for r in rows], [r["response"] for r in rows]
tok = models.load_tokenizer(str(run / "sft"))
eval_prompts = [json.loads(line)["prompt"] for line in (run / "data" / "eval_prompts.jsonl").open()][:200]
policy = models.load_causal_lm(str(run / "ppo"), tokenizer=tok).eval()
samples = HFEngine(policy, tok, 256, "bf16").generate(
    eval_prompts, SamplingParams(n=1, temperature=0.7, max_new_tokens=48, seed=0))
del policy

variants = {}
for name, precision in (("fp32 weights", "no"), ("bf16 blocks", "bf16")):
    ref = models.load_causal_lm(str(run / "sft"), tokenizer=tok).eval()
    models.inference_weights(ref, precision)  # "no": unchanged
    variants[name] = (RewardModel.load(str(run / "rm"), torch.device("cpu"), precision), ref)

times: dict[str, list[float]] = {f"{w}/{v}": [] for w in ("score", "logps") for v in variants}
outputs: dict[str, torch.Tensor] = {}
for r in range(repeats):
    for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
        rm, ref = variants[name]
        for what, fn in (("score", lambda: rm.score(prompts, texts, 256, 1024, "bf16")[0]),
                         ("logps", lambda: response_logps(ref, samples, 256, "bf16"))):
            start = time.perf_counter()
            outputs[f"{what}/{name}"] = fn()
            times[f"{what}/{name}"].append(time.perf_counter() - start)
result = {"run": str(run), "repeats": repeats, "samples": {"score": len(rows), "logps": len(samples.texts)},
          "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
          "median_s": {k: round(statistics.median(v), 2) for k, v in times.items()},
          "same_bits": {w: torch.equal(*[outputs[f"{w}/{v}"] for v in variants]) for w in ("score", "logps")}}
print(json.dumps(result, indent=2))
