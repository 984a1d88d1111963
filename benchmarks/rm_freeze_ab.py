"""The pipeline's RM stage with 10 against 15 frozen blocks, A/B alternating in one process (session 9): the
default preset's RM options on a pipeline run's SFT model and rankings, cut to STEPS steps; prints the time of the
steps after the first (from metrics.jsonl) and of the whole call (loading, normalisation, evaluation, saving).

    python benchmarks/rm_freeze_ab.py runs/pipeline-s13 4 20      # RUN PAIRS STEPS
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from rlhfkit.pipeline import PipelineConfig, resolve, train_rm
from rlhfkit.tracking import read_metrics

run = sys.argv[1] if len(sys.argv) > 1 else "runs/pipeline-s13"
pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 4
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 20
results: dict[int, list[tuple[float, float]]] = {}
for rep in range(pairs):
    for frozen in ((10, 15) if rep % 2 == 0 else (15, 10)):
        cfg = resolve(PipelineConfig(output="/tmp/rlhfkit-rm-freeze-ab"))
        cfg.rm.update({"freeze_layers": frozen, "max_steps": steps})
        out = Path(f"/tmp/rlhfkit-rm-freeze-ab/rm{frozen}")
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        train_rm(cfg, f"{run}/sft", f"{run}/comparisons/rankings.jsonl", out)
        total = time.perf_counter() - start
        logged = [m for m in read_metrics(out) if "perf/tokens_per_s" in m]
        step_s = sum((b["train/tokens"] - a["train/tokens"]) / b["perf/tokens_per_s"]
                     for a, b in zip(logged, logged[1:]))
        results.setdefault(frozen, []).append((round(step_s, 1), round(total, 1)))
        print(frozen, results[frozen][-1], flush=True)
print(json.dumps({f"{k} frozen (steps s, call s)": v for k, v in results.items()}))
