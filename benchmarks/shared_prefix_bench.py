"""Shared prompt prefixes against whole sequences: forward + backward time of one training micro-batch of the RM,
DPO and PPO on a pipeline run's real data (the SFT model, its K = 4 rankings and its best-of-16 samples).

Each trainer's own batch code runs both ways on the same rows, bf16 autocast over fp32 weights, as in training,
once with the attention kernel rlhfkit picks (`models.training_attention`: math at these lengths) and once with
torch's flash kernel forced (`MATH_ATTENTION_MAX_LEN = 0`):
- RM: `reward.collate_preferences` (8 prompts × 4 responses, 10 lowest layers frozen as the pipeline does) ->
  `reward.score_rewards` -> `reward.preference_loss_sum` -> backward
- DPO: `dpo.concatenated_logps` on 8 pairs (16 sequences) through `models.SelectedLogits` -> backward
- PPO: `ppo.token_logprobs` on 4 prompts × 4 samples (a training micro-batch of 16 rows) -> backward
Reports the median of REPEATS timed runs after one warm-up round, and the RM tokens each way actually runs.

    python benchmarks/shared_prefix_bench.py runs/pipeline-s6 5      # RUN [REPEATS]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rlhfkit import models
from rlhfkit.algos import dpo, ppo, reward
from rlhfkit.data import chat
from rlhfkit.data.collate import pad_left

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/pipeline-s4")
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
sft_dir, rankings = str(run / "sft"), str(run / "comparisons" / "rankings.jsonl")
cast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731


def timed(fn) -> dict[str, float]:
    """Median seconds of `fn` with each attention kernel, runs of the two interleaved (the machine drifts)."""
    times: dict[str, list[float]] = {"flash": [], "picked": []}
    for i in range(repeats + 1):
        for kernel in times:
            models.MATH_ATTENTION_MAX_LEN = 0 if kernel == "flash" else 128
            t = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[kernel].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


results = {}
# RM
tok = models.load_tokenizer(sft_dir)
reward.set_reward_pad_token(tok)
cfg = reward.RMConfig(model=sft_dir, freeze_layers=10, dtype="bf16")
rm = reward.build_model(cfg, tok).train()
items, _ = reward.encode_preferences(tok, reward.load_preferences(rankings, None), 256)
items = items[:8]
for share in (False, True):
    batch = reward.collate_preferences(items, tok.pad_token_id, share)

    def step(batch=batch):
        rm.zero_grad(set_to_none=True)
        with cast():
            scores = reward.score_rewards(rm, batch)
        reward.preference_loss_sum(scores, batch).backward()
    run_tokens = int(batch.attention_mask.numel() + (0 if batch.prefix_ids is None else batch.prefix_ids.numel()))
    results[f"rm/{'shared' if share else 'whole'}"] = {**timed(step), "tokens_run": run_tokens}
rm = None  # free it before DPO loads its model
# DPO
tok = models.load_tokenizer(sft_dir)
pairs, _ = dpo.load_pairs(rankings, None, tok, 256)
pairs = pairs[:8]
net = models.SelectedLogits(models.load_causal_lm(sft_dir, tokenizer=tok)).eval()
for share in (False, True):
    def step(share=share):
        net.zero_grad(set_to_none=True)
        with cast():
            c, r = dpo.concatenated_logps(net, pairs, tok.pad_token_id, torch.device("cpu"), share)
        (c.sum() - r.sum()).backward()
    results[f"dpo/{'shared' if share else 'whole'}"] = timed(step)
# PPO: 4 prompts × 4 of their best-of-16 samples, laid out as the rollout engine lays them out
rows = [json.loads(line) for line in (run / "best_of_n" / "samples.jsonl").read_text().splitlines()]
rows = [r for r in rows if r["prompt_index"] < 4 and r["sample_index"] < 4]
prompt_ids = [chat.encode(tok, chat.render(tok, r["prompt"], add_generation_prompt=True)) for r in rows]
resp = [tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        for r in rows]
p_ids, p_mask = pad_left(prompt_ids, tok.pad_token_id)
width = max(map(len, resp))
r_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in resp])
r_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in resp])
input_ids, attention_mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
rollout = ppo.Rollout(input_ids, attention_mask, (attention_mask.cumsum(-1) - 1).clamp(min=0), r_mask.float(),
                      None, None, None, torch.zeros(len(rows)))
for share in (False, True):
    def step(share=share):
        net.zero_grad(set_to_none=True)
        with cast():
            logps, _ = ppo.token_logprobs(net, rollout, 1.0, share=share)
        logps.sum().backward()
    results[f"ppo/{'shared' if share else 'whole'}"] = timed(step)
for k in ("rm", "dpo", "ppo"):  # the plain computation: whole sequences, flash kernel
    results[f"{k}/speedup"] = results[f"{k}/whole"]["flash"] / results[f"{k}/shared"]["picked"]
print(json.dumps(results, indent=1))
out = Path("benchmarks/results/shared_prefix_bench.json")
out.write_text(json.dumps({"run": str(run), "repeats": repeats, "results": results}, indent=1) + "\n")
