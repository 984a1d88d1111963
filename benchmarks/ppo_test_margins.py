"""The margin of tests/algos/test_ppo.py's learning test (`test_each_estimator_raises_the_reward_with_bounded_kl`)
over seeds: the same SFT policy and PPO settings as the test, each estimator with PPO seeds 0-4, and the margin
the test asks for (the mean score of the last 3 iterations against that of the first 2: more than +0.5).

A learning test must hold on every CPU, not for one lucky seed on one: run this once per kernel set, e.g.

    .venv/bin/python benchmarks/ppo_test_margins.py                                   # this CPU's own kernels
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 RLHFKIT_CPU_BF16=0 \\
        .venv/bin/python benchmarks/ppo_test_margins.py                               # AVX2 kernels

and put its table in RESULTS.md. About 4 minutes on 2 cores; `--quick` (one seed, 2 iterations) checks the harness.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate.state import AcceleratorState  # noqa: E402

from rlhfkit.algos import ppo, sft  # noqa: E402
from rlhfkit.tracking import read_metrics  # noqa: E402
from tests.algos.test_ppo import cfg_for  # noqa: E402

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce++")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="PPO seeds 0..N-1")
    p.add_argument("--iterations", type=int, default=14, help="as in the test")
    p.add_argument("--quick", action="store_true", help="one seed, 2 iterations: checks the harness")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.iterations = 1, 2
    tmp = Path(tempfile.mkdtemp(prefix="ppo-margins-"))
    policy = tmp / "sft"  # the test's `sft_policy` fixture
    sft.train(sft.SFTConfig(model="tiny-llama", output=str(policy), max_steps=40, batch_size=8, lr=1e-2,
                            schedule="constant", warmup_ratio=0.0, dtype="fp32", val_fraction=0.0, max_length=256))
    rows = []
    for advantage in ESTIMATORS:
        critic_free = advantage in ("grpo", "rloo")
        starts, ends, margins = [], [], []
        for seed in range(args.seeds):
            AcceleratorState._reset_state(reset_partial_state=True)
            d = tmp / f"{advantage}-{seed}"
            ppo.train(cfg_for(d, str(policy), advantage=advantage, n_samples=4 if critic_free else 1,
                              rollout_prompts=8 if critic_free else 32, iterations=args.iterations, seed=seed))
            scores = [m["ppo/score"] for m in read_metrics(d / "out") if "ppo/score" in m]
            start, end = sum(scores[:2]) / 2, sum(scores[-3:]) / 3
            starts.append(start), ends.append(end), margins.append(end - start)
        rows.append(f"| {advantage} | {min(starts):.3f}–{max(starts):.3f} | {min(ends):.3f}–{max(ends):.3f} | "
                    f"{min(margins):+.3f} |")
    kernels = os.environ.get("ATEN_CPU_CAPABILITY", "default")
    print(f"\nkernels: ATEN_CPU_CAPABILITY={kernels}, {args.iterations} iterations, seeds 0-{args.seeds - 1}")
    print("| estimator | start (first 2) | end (last 3) | smallest end − start |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
