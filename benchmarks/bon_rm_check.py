"""Offline best-of-n check of a reward model on a pipeline run's best-of-16 samples (issue 6).

Scores the run's best_of_n/samples.jsonl (n = 16 samples of the SFT model per evaluation prompt) with RM_DIR, picks
the best of the first k samples for k = 1, 2, 4, 8, 16, and judges the picks by the gold score: mean gold, win
rate against sample 0 (ties half), gold per family, the oracle (best gold of 16), and the RM's pairwise accuracy
against the gold order of the samples (gold ties left out). Appends a JSON line to --out.

    python benchmarks/bon_rm_check.py runs/pipeline-default runs/pipeline-default/rm
"""
import json, sys, time
import torch
from rlhfkit.rewards import RewardModel
from rlhfkit.sim import tasks

run, rm_dir = sys.argv[1], sys.argv[2]
out_path = sys.argv[3] if len(sys.argv) > 3 else "benchmarks/results/bon_rm_check.jsonl"
rows = [json.loads(l) for l in open(f"{run}/best_of_n/samples.jsonl")]
meta = [json.loads(l) for l in open(f"{run}/data/eval_prompts.jsonl")]
P, n = len(meta), 16
gold = torch.tensor(tasks.gold_reward(None, [r["response"] for r in rows], [meta[r["prompt_index"]] for r in rows]),
                    dtype=torch.float64).view(P, n)
t = time.perf_counter()
rm = RewardModel.load(rm_dir, torch.device("cpu"))
s, _ = rm.score([r["prompt"] for r in rows], [r["response"] for r in rows], 128, 1024, "bf16")
s = s.view(P, n)
fam = [m["family"] for m in meta]
out = {"rm": rm_dir, "score_s": round(time.perf_counter() - t, 1)}
for k in (1, 2, 4, 8, 16):
    pick = s[:, :k].argmax(dim=1)
    g = gold[torch.arange(P), pick]
    w = ((g > gold[:, 0]).double() + 0.5 * (g == gold[:, 0]).double()).mean()
    out[f"n{k}"] = {"gold": round(float(g.mean()), 3), "win_vs_s0": round(float(w), 3)}
g16 = gold[torch.arange(P), s.argmax(dim=1)]
out["fam16"] = {f: round(float(g16[[i for i in range(P) if fam[i] == f]].mean()), 3) for f in sorted(set(fam))}
out["fam1"] = {f: round(float(gold[[i for i in range(P) if fam[i] == f], 0].mean()), 3) for f in sorted(set(fam))}
out["oracle16"] = round(float(gold.max(dim=1).values.mean()), 3)
# pairwise accuracy of the RM against gold ordering on these samples (ties in gold skipped)
acc, cnt = 0.0, 0
for i in range(P):
    for a in range(n):
        for b in range(a + 1, n):
            if gold[i, a] != gold[i, b]:
                cnt += 1
                acc += float((s[i, a] - s[i, b]) * (gold[i, a] - gold[i, b]) > 0)
out["gold_pair_acc"] = round(acc / cnt, 3)
print(json.dumps(out))
with open(out_path, "a") as f:
    f.write(json.dumps(out) + "\n")
