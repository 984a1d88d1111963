"""PPO's in-process backend against --backend ray on the same run: seconds per iteration, by phase, and the overhead.

Each configuration is one real run of `rlhfkit ppo` (GAE: actor, critic, reference, reward function, one or two hf
rollout engines; the actor and the critic one worker each, or a group of two) on a fresh local Ray cluster that the run starts itself; the same seed, so the same samples and
updates (tests/algos/test_ppo_ray.py checks that they agree). Reported: the median wall time of an iteration after
the first (`time/iteration`), its phases (generate, the log-prob/value passes, train), the start-up (process start
to the first iteration's end, less that iteration), and the overhead of Ray against the in-process run.

    python benchmarks/ray_bench.py --results-md benchmarks/RESULTS.md
    python benchmarks/ray_bench.py --quick      # tiny-llama, two iterations: checks the harness
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, write_section  # noqa: E402

# (row, extra options)
CONFIGS = [("in-process (--backend local)", []),
           ("Ray, --colocate all", ["--backend", "ray", "--colocate", "all"]),
           ("Ray, --colocate none", ["--backend", "ray", "--colocate", "none"]),
           ("Ray, --colocate none, 2 rollout engines", ["--backend", "ray", "--colocate", "none",
                                                         "--rollout-engines", "2"]),
           *((f"Ray, --colocate all, actor and critic {sharding} groups of 2 workers",
              ["--backend", "ray", "--colocate", "all", "--actor-workers", "2", "--critic-workers", "2", "--sharding",
               sharding]) for sharding in ("ddp", "fsdp2"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quick", action="store_true", help="tiny-llama, two iterations (harness check)")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rlhfkit-ray-bench"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results-md", type=Path, default=None)
    args = p.parse_args()
    model, iterations = ("tiny-llama", 2) if args.quick else (args.model, args.iterations)
    rows = []
    for i, (name, extra) in enumerate(CONFIGS):
        out = args.workdir / f"ppo-{i}"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "ppo", "--policy", model, "--reward-fn",
                               f"{HERE / 'ppo_rewards.py'}:length_target", "--iterations", str(iterations),
                               "--rollout-prompts", "8", "--n-samples", "2", "--max-new-tokens", "32",
                               "--minibatch-size", "16", "--batch-size", "8", "--sample-every", "0", "--output",
                               str(out), "--overwrite", *extra], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            (args.workdir / f"ppo-{i}.stderr").write_text(proc.stderr)
            raise SystemExit(f"{name} failed (its whole stderr: {args.workdir / f'ppo-{i}.stderr'}):\n"
                             f"{proc.stderr[-3000:]}")
        logged = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "ppo/score" in m]
        after_first = logged[1:] or logged
        median = lambda key: statistics.median(m[key] for m in after_first)  # noqa: E731
        rows.append({"config": name, "iteration_s": median("time/iteration"), "generate_s": median("time/generate"),
                     "passes_s": median("time/logprobs") + median("time/reference") + median("time/values"),
                     "train_s": median("time/train"), "sync_s": median("time/sync"),
                     "start_s": wall - sum(m["time/iteration"] for m in logged),
                     "scores": [m["ppo/score"] for m in logged]})
    base, first = rows[0]["iteration_s"], rows[0]["scores"]
    for r in rows:  # the first iteration whose mean score differs from the in-process run's (None: none does)
        r["differs_at"] = next((k + 1 for k, (a, b) in enumerate(zip(r["scores"], first)) if a != b), None)
    same = lambda r: "yes" if r["differs_at"] is None else f"no, from iteration {r['differs_at']}"  # noqa: E731
    lines = ["| | s/iteration | overhead vs in-process | generate | log-prob + value passes | train | weight sync | "
             "start-up and final save, s | scores = in-process |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['iteration_s']:.2f} | {100 * (r['iteration_s'] / base - 1):+.0f}% | "
              f"{r['generate_s']:.2f} | {r['passes_s']:.2f} | {r['train_s']:.2f} | {r['sync_s']:.3f} | "
              f"{r['start_s']:.1f} | {same(r)} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.results_md:
        command = f"python benchmarks/ray_bench.py --model {model} --iterations {iterations} " \
                  "--results-md benchmarks/RESULTS.md"
        text = (f"{model}, PPO with GAE: {iterations} iterations of 8 prompts × 2 samples, 32 new tokens, minibatches "
                f"of 16, a reward function; medians after the first iteration. Ray runs a fresh local cluster per "
                f"run, every worker a process; the actor and the critic are one worker each, or a group of two (one "
                f"torch.distributed process group each, gloo). The workers of different bundles compute at once, so "
                f"a run that starts its own cluster gives each worker this machine's threads divided by the bundles "
                f"(every role in one bundle keeps them all): without that division, on 2 cores, --colocate none took "
                f"about 50 s an iteration and the ddp groups 48 s, their threads oversubscribing the cores. The "
                f"overhead is what moving the rollout batch and the weights through the object store and the extra "
                f"processes cost, not a speed-up; the log-prob, reference and value passes of Ray run side by side "
                f"(their sum is shown). The last column compares each iteration's mean score with the in-process "
                f"run's, bit for bit: in bf16 a kernel run with another thread count or batch shape, or gradients "
                f"summed over a group in another order, round differently and change some sampled tokens (in fp32 "
                f"they agree: tests/algos/test_ppo_ray.py).\n\n{table}")
        write_section(args.results_md, "ray", "PPO in one process against --backend ray", command, machine_info(),
                      text)


if __name__ == "__main__":
    main()
