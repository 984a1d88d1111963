"""The pipeline's no-grad work on a run's real data: RM scoring of best-of-n samples, evaluation's KL log-probs and
sampling, each timed on the same inputs. Only public calls that every version has are used, so the same script
measures two commits: run it from a checkout of each (or with PYTHONPATH pointing at the other's src/).

- score:    `RewardModel.score` of the run's first 640 best-of-16 samples (40 prompts × 16, samples.jsonl), bf16
- logps:    `evaluation.response_logps` of 200 samples of the PPO policy (drawn first, not timed), bf16
- generate: `HFEngine.generate`, 48 evaluation prompts × 16 samples, temperature 0.7, ≤ 48 tokens
each at batch 256, the default preset's for best-of-n and evaluation.

Reports the median of REPEATS runs after one warm-up, and what came out (token and character counts of the
samples, equal on both commits when the samples are; mean score and log-prob, equal up to bf16 rounding).

    python benchmarks/inference_bench.py runs/pipeline-s6 1 [OUT.jsonl]     # RUN [REPEATS] [OUT]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlhfkit import models
from rlhfkit.evaluate.evaluation import response_logps
from rlhfkit.rewards import RewardModel
from rlhfkit.rollout import SamplingParams
from rlhfkit.rollout.hf import HFEngine

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/pipeline-s6")
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 1
out_path = sys.argv[3] if len(sys.argv) > 3 else None


def median_time(fn) -> tuple[float, object]:
    result, times = fn(), []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


results: dict[str, object] = {
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(models.__file__).parent).stdout.strip(), "run": str(run), "repeats": repeats}
# 1. RM scoring of best-of-16 samples (40 prompts × 16)
rows = [json.loads(line) for line in (run / "best_of_n" / "samples.jsonl").open()][:640]
rm = RewardModel.load(str(run / "rm"), torch.device("cpu"))
prompts, texts = [r["prompt"] for r in rows], [r["response"] for r in rows]
t, scores = median_time(lambda: rm.score(prompts, texts, 256, 1024, "bf16")[0])
results["score"] = {"samples": len(rows), "seconds": t, "mean_score": float(scores.mean())}
# 2. evaluation's KL log-probs: 200 samples of the PPO policy under itself
eval_prompts = [json.loads(line)["prompt"] for line in (run / "data" / "eval_prompts.jsonl").open()][:200]
tok = models.load_tokenizer(str(run / "ppo"))
policy = models.load_causal_lm(str(run / "ppo"), tokenizer=tok).eval()
samples = HFEngine(policy, tok, 128, "bf16").generate(eval_prompts, SamplingParams(n=1, temperature=0.7,
                                                                                    max_new_tokens=48, seed=0))
t, logps = median_time(lambda: response_logps(policy, samples, 256, "bf16"))
results["logps"] = {"samples": len(samples.texts), "response_tokens": int(samples.response_mask.sum()),
                    "seconds": t, "mean_logp": float(logps.mean())}
# 3. sampling from the SFT model, best-of-16 style
tok = models.load_tokenizer(str(run / "sft"))
sft = models.load_causal_lm(str(run / "sft"), tokenizer=tok).eval()
for batch in (256,):
    engine = HFEngine(sft, tok, batch, "bf16")
    params = SamplingParams(n=16, temperature=0.7, max_new_tokens=48, seed=0)
    t, s = median_time(lambda: engine.generate(eval_prompts[:48], params))
    tokens = int(s.response_mask.sum())
    results[f"generate/{batch}"] = {"rows": len(s.texts), "tokens": tokens, "seconds": t, "tokens_per_s": tokens / t,
                                    "text_chars": sum(map(len, s.texts))}  # equal samples: equal counts
print(json.dumps(results, indent=2))
if out_path:
    with open(out_path, "a") as f:
        f.write(json.dumps(results) + "\n")
