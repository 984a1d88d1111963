"""PPO's update with the logged entropy computed without a graph (entropy_coef 0) against with one, A/B in one
process (session 9). On a pipeline run's SFT model and RL prompts: one iteration's rollout (16 prompts × 4
samples, at most 48 new tokens), then the forward and backward of its 4 minibatches of 16 under bf16 autocast,
REPEATS times per variant, alternating. Prints every time and the medians.

    python benchmarks/ppo_entropy_bench.py runs/pipeline-s13 8      # RUN REPEATS
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import replace

import torch

from rlhfkit import models
from rlhfkit.algos import ppo
from rlhfkit.rollout import SamplingParams
from rlhfkit.rollout.hf import HFEngine

run = sys.argv[1] if len(sys.argv) > 1 else "runs/pipeline-s13"
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 8
torch.manual_seed(0)
cfg = ppo.PPOConfig(policy=f"{run}/sft", reward_fn="rlhfkit.sim.tasks:gold_reward",
                    prompts=f"{run}/data/rl_prompts.jsonl", minibatch_size=16,
                    batch_size=16, n_samples=4, advantage="rloo")
tok = models.load_tokenizer(cfg.policy)
actor = models.load_causal_lm(cfg.policy, tokenizer=tok)
net = torch.nn.ModuleDict({"actor": models.SelectedLogits(actor)}).eval()
prompts, _ = ppo.load_prompts(cfg)
samples = HFEngine(actor, tok, 64, "bf16").generate(
    prompts[:16], SamplingParams(n=4, temperature=1.0, max_new_tokens=48, seed=1))
ids, mask = samples.sequences()
rollout = ppo.Rollout(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), samples.response_mask.float(), None, None,
                      None, torch.zeros(64))
with torch.autocast("cpu", torch.bfloat16):
    logps = ppo.in_chunks(lambda b: ppo.token_logprobs(net["actor"], b, 1.0, share=True)[0], rollout, 16)
rollout = ppo.compute_advantages(replace(rollout, logprobs=logps, ref_logprobs=logps, scores=torch.randn(64)), cfg,
                                 0.3)
plain = ppo.token_logprobs
times: dict[str, list[float]] = {"entropy with a graph": [], "entropy without a graph": []}
for r in range(repeats):
    for grad in ((True, False) if r % 2 else (False, True)):
        ppo.token_logprobs = lambda *a, grad=grad, **k: plain(*a, **{**k, "entropy_grad": grad})
        start = time.perf_counter()
        for m in range(0, 64, 16):
            idx = torch.arange(m, m + 16)
            with torch.autocast("cpu", torch.bfloat16):
                loss, _ = ppo.minibatch_loss(net, rollout.rows(idx), cfg, 0.3,
                                             float(rollout.response_mask[idx].sum()))
            loss.backward()
            net.zero_grad(set_to_none=True)
        times["entropy with a graph" if grad else "entropy without a graph"].append(time.perf_counter() - start)
        print({k: [round(x, 2) for x in v] for k, v in times.items()}, flush=True)
print(json.dumps({k: {"median_s": round(statistics.median(v), 3), "runs": [round(x, 2) for x in v]}
                  for k, v in times.items()}))
