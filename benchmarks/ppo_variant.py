"""A PPO variant on a pipeline run's SFT model and RM, judged on the RL prompts, not the evaluation ones (issue 6).

    python benchmarks/ppo_variant.py RUN OUT PPO_OVERRIDES_JSON

Trains PPO with RUN's own PPO options (RUN/ppo/run.json) updated by PPO_OVERRIDES_JSON into OUT (OUT = RUN/ppo
with '{}' only evaluates RUN's policy), then runs `rlhfkit eval` of RUN's SFT model and the new policy on RUN's
RL prompts (the prompts PPO trained on, whose gold score it never saw) with RUN's evaluation settings, into
OUT/rl_eval, and prints the gold scores, the win rate against SFT and the KL. Choosing PPO's preset on these keeps
the 200 held-out evaluation prompts out of the choice. Session 10 ran, with RUN = runs/pipeline-s17:
    python benchmarks/ppo_variant.py runs/pipeline-s17 runs/pipeline-s17/ppo '{}'
    python benchmarks/ppo_variant.py runs/pipeline-s17 /tmp/exp/f15i16lr2 \
        '{"freeze_layers": 15, "iterations": 16, "lr": 2e-5}'
"""
import json
import sys
import time
from pathlib import Path

from rlhfkit.algos import ppo
from rlhfkit.config import from_dict
from rlhfkit.evaluate.evaluation import EvalConfig, evaluate

run, out, over = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
start = time.perf_counter()
if out != run / "ppo":
    cfg = {**json.loads((run / "ppo" / "run.json").read_text())["config"], **over, "output": str(out)}
    ppo.train(from_dict(ppo.PPOConfig, cfg, "ppo_variant"))
seconds = time.perf_counter() - start
# RUN's own evaluation settings (sampling, judge, reference), on the two models and the RL prompts; the Elo
# bootstrap, which no printed figure uses, cut to 100
ev = from_dict(EvalConfig, {**json.loads((run / "eval" / "run.json").read_text())["config"],
                            "models": [str(run / "sft"), str(out)], "labels": ["sft", "ppo"],
                            "prompts": str(run / "data" / "rl_prompts.jsonl"), "output": str(out / "rl_eval"),
                            "bootstrap": 100}, "ppo_variant.eval")
evaluate(ev)
r = json.loads((out / "rl_eval" / "eval.json").read_text())
m, w = r["models"], r["win_rates"]["ppo"]["sft"]
families = {k.split("/")[1]: round(v, 3) for k, v in m["ppo"].items() if k.startswith("score/")}
print(json.dumps({"variant": over, "ppo_seconds": round(seconds), "gold_sft": m["sft"]["mean_score"],
                  "gold_ppo": m["ppo"]["mean_score"], "win_vs_sft": w, "kl": m["ppo"]["kl_to_reference"],
                  "gold_ppo_by_family": families}))
