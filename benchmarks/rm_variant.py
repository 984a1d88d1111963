"""A reward-model variant on a pipeline run's SFT model, for benchmarks/bon_rm_check.py (issue 6).

    python benchmarks/rm_variant.py OUT K PROMPTS TEMPERATURE RM_OVERRIDES_JSON [RUN]

Takes the first PROMPTS of RUN's RM prompts (families in turn), samples K responses each from RUN's SFT model at
TEMPERATURE, ranks them with the simulated labellers (the pipeline's `label`), and trains the RM with the default
preset's options updated by RM_OVERRIDES_JSON (the pipeline's `train_rm`). OUT/comparisons/rankings.jsonl is reused
when present. Session 3 ran, with RUN = runs/pipeline-default:
    python benchmarks/rm_variant.py /tmp/exp/e2 4 256 1.0 '{"lr": 1e-4}'    # (the run's own rankings copied in)
    python benchmarks/rm_variant.py /tmp/exp/e1 8 128 1.0 '{}'
"""
import json, sys
from pathlib import Path
from rlhfkit.pipeline import PipelineConfig, resolve, label, train_rm

out, k, n_prompts, temp, over = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), json.loads(sys.argv[5])
base = Path(sys.argv[6] if len(sys.argv) > 6 else "runs/pipeline-default")
(out / "data").mkdir(parents=True, exist_ok=True)
rows = open(base / "data/rm_prompts.jsonl").read().splitlines()
(out / "data/rm_prompts.jsonl").write_text("\n".join(rows[:n_prompts]) + "\n")
cfg = resolve(PipelineConfig(output=str(out), k=k))
cfg.rm.update(over)
cfg.sample["temperature"] = temp
sft = str(base / "sft")
if not (out / "comparisons/rankings.jsonl").exists():
    (out / "comparisons").mkdir(exist_ok=True)
    print(label(cfg, sft, out / "comparisons", cfg.seed))
print(train_rm(cfg, sft, str(out / "comparisons/rankings.jsonl"), out / "rm"))
